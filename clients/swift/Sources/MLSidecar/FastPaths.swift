import Foundation

// The lines the sidecar writes most, read without JSONDecoder, which costs about 10 µs a
// line on a small machine (a `$/token` stream would top out near 100,000 events/s). Only the
// exact shape the sidecar writes (msgspec, fields in order, ASCII) is taken; any other line
// returns nil and goes through `IncomingMessage`.

/// The id of a response (`{"jsonrpc":"2.0","id":7,...`): routed here, parsed once by its consumer.
func responseID(_ line: UnsafeRawBufferPointer) -> Int? {
    var scanner = ByteScanner(line)
    guard scanner.skip(#"{"jsonrpc":"2.0","id":"#), let id = scanner.int(), scanner.skip(",") else { return nil }
    return id
}

/// `{"jsonrpc":"2.0","id":7,"result":{}}`: the answer to `ping` (and any other `EmptyResult`),
/// passed on without a copy of the line or a JSONDecoder.
func isEmptyResult(_ line: UnsafeRawBufferPointer) -> Bool {
    var scanner = ByteScanner(line)
    return scanner.skip(#"{"jsonrpc":"2.0","id":"#) && scanner.int() != nil && scanner.skip(#","result":{}}"#) && scanner.atEnd
}

/// `{"jsonrpc":"2.0","method":"$/token","params":{"id":5,"seq":0,"text":"..."}}`
func tokenEvent(_ line: UnsafeRawBufferPointer) -> TokenEvent? {
    var scanner = ByteScanner(line)
    guard scanner.skip(#"{"jsonrpc":"2.0","method":"$/token","params":{"id":"#), let id = scanner.int(),
          scanner.skip(#","seq":"#), let seq = scanner.int(), scanner.skip(#","text":""#),
          let text = scanner.stringBody(), scanner.skip("}}"), scanner.atEnd else { return nil }
    return TokenEvent(id: .int(id), seq: seq, text: text)
}

func responseID(_ line: Data) -> Int? { line.withUnsafeBytes { responseID($0) } }
func isEmptyResult(_ line: Data) -> Bool { line.withUnsafeBytes { isEmptyResult($0) } }
func tokenEvent(_ line: Data) -> TokenEvent? { line.withUnsafeBytes { tokenEvent($0) } }

private struct ByteScanner {
    let bytes: UnsafeRawBufferPointer
    var index = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    var atEnd: Bool { index == bytes.count }

    mutating func skip(_ literal: StaticString) -> Bool {
        let count = literal.utf8CodeUnitCount
        guard bytes.count - index >= count,
              memcmp(bytes.baseAddress! + index, literal.utf8Start, count) == 0 else { return false }
        index += count
        return true
    }

    /// A non-negative integer of at most 18 digits.
    mutating func int() -> Int? {
        let start = index
        var value = 0
        while index < bytes.count, index - start < 18, (0x30...0x39).contains(bytes[index]) {
            value = value * 10 + Int(bytes[index] - 0x30)
            index += 1
        }
        return index > start ? value : nil
    }

    /// The rest of a JSON string after its opening quote, up to and past the closing one.
    mutating func stringBody() -> String? {
        var out: [UInt8] = []
        while index < bytes.count {
            let byte = bytes[index]
            index += 1
            switch byte {
            case UInt8(ascii: "\""):
                return String(validating: out, as: UTF8.self)
            case UInt8(ascii: "\\"):
                guard index < bytes.count else { return nil }
                let escape = bytes[index]
                index += 1
                switch escape {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(escape)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    guard let scalar = unicodeEscape() else { return nil }
                    out.append(contentsOf: String(Character(scalar)).utf8)
                default: return nil
                }
            case 0..<0x20: return nil
            default: out.append(byte)
            }
        }
        return nil
    }

    /// After `\u`: four hex digits, or a surrogate pair written as two escapes.
    private mutating func unicodeEscape() -> Unicode.Scalar? {
        guard let first = hex4() else { return nil }
        if (0xD800..<0xDC00).contains(first) {
            guard skip("\\u"), let second = hex4(), (0xDC00..<0xE000).contains(second) else { return nil }
            return Unicode.Scalar(0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00))
        }
        return Unicode.Scalar(first)  // nil for a lone low surrogate
    }

    private mutating func hex4() -> UInt32? {
        guard bytes.count - index >= 4 else { return nil }
        var value: UInt32 = 0
        for _ in 0..<4 {
            guard let digit = Character(Unicode.Scalar(bytes[index])).hexDigitValue else { return nil }
            value = value << 4 | UInt32(digit)
            index += 1
        }
        return value
    }
}
