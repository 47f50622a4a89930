import Foundation

/// JSONDecoder is thread-safe; one instance saves an allocation per response.
let sharedDecoder = JSONDecoder()

/// The line of a request (`id` set) or notification, newline included. The envelope is written
/// by hand: JSONEncoder costs microseconds a call on Linux, a large share of a 12 µs `ping` round
/// trip. Params still go through JSONEncoder, except `Empty` (`{}`) and nil (left out), so every
/// typed params struct is encoded exactly as before. Field order as JSONEncoder wrote it.
func requestFrame<Params: Encodable>(id: RequestID?, method: String, params: Params?,
                                     encoder: @autoclosure () -> JSONEncoder) throws -> [UInt8] {
    let encoded: Data? = try params.flatMap { $0 is Empty ? nil : try encoder().encode($0) }
    var method = method, stringID: String? = nil
    if case .string(let value) = id { stringID = value }
    // At most 6 bytes per byte of a JSON string (\u00XX); 20 digits and a sign for an Int.
    let bound = 64 + 6 * method.utf8.count + 6 * (stringID?.utf8.count ?? 0) + (encoded?.count ?? 0)
    return Array(unsafeUninitializedCapacity: bound) { buffer, count in
        var out = ByteWriter(buffer.baseAddress!)
        out.put(#"{"jsonrpc":"2.0""#)
        if let id {
            out.put(#","id":"#)
            switch id {
            case .int(let value): out.putDecimal(value)
            case .string(var value): value.withUTF8 { out.putJSONString($0) }
            }
        }
        out.put(#","method":"#)
        method.withUTF8 { out.putJSONString($0) }
        if params != nil {
            out.put(#","params":"#)
            if let encoded {
                encoded.withUnsafeBytes { out.put($0) }
            } else {
                out.put("{}")
            }
        }
        out.put("}\n")
        count = buffer.baseAddress!.distance(to: out.next)
        precondition(count <= bound)
    }
}

/// Writes bytes into memory known to be large enough.
private struct ByteWriter {
    var next: UnsafeMutablePointer<UInt8>
    init(_ start: UnsafeMutablePointer<UInt8>) { next = start }

    mutating func put(_ literal: StaticString) {
        next.update(from: literal.utf8Start, count: literal.utf8CodeUnitCount)
        next += literal.utf8CodeUnitCount
    }

    mutating func put(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        UnsafeMutableRawPointer(next).copyMemory(from: base, byteCount: bytes.count)
        next += bytes.count
    }

    mutating func put(_ byte: UInt8) {
        next.pointee = byte
        next += 1
    }

    mutating func putDecimal(_ value: Int) {
        if value < 0 { put(UInt8(ascii: "-")) }
        var magnitude = value.magnitude, digits = 1
        var rest = magnitude
        while rest >= 10 { rest /= 10; digits += 1 }
        var index = digits
        repeat {
            index -= 1
            next[index] = UInt8(ascii: "0") + UInt8(magnitude % 10)
            magnitude /= 10
        } while index > 0
        next += digits
    }

    /// A JSON string: quotes, backslashes and control characters escaped, everything else as
    /// UTF-8 (slashes unescaped, as `.withoutEscapingSlashes` wrote them).
    mutating func putJSONString(_ bytes: UnsafeBufferPointer<UInt8>) {
        put(UInt8(ascii: "\""))
        for byte in bytes {
            switch byte {
            case UInt8(ascii: "\""): put(#"\""#)
            case UInt8(ascii: "\\"): put(#"\\"#)
            case 0x0A: put(#"\n"#)
            case 0x0D: put(#"\r"#)
            case 0x09: put(#"\t"#)
            case 0..<0x20:
                let hex: StaticString = "0123456789abcdef"
                put(#"\u00"#)
                put(hex.utf8Start[Int(byte >> 4)])
                put(hex.utf8Start[Int(byte & 0xF)])
            default: put(byte)
            }
        }
        put(UInt8(ascii: "\""))
    }
}

/// A line from the sidecar, decoded only as far as routing needs: events fully (they are the hot
/// path), responses by id only; the consumer decodes the result into its own type.
struct IncomingMessage: Decodable {
    enum Body {
        case event(SidecarEvent)
        case response(RequestID)
        case other
    }

    let body: Body

    enum CodingKeys: String, CodingKey { case id, method, params }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        if let method = try c.decodeIfPresent(String.self, forKey: .method) {
            body = try SidecarEvent.decode(method: method, from: c, forKey: .params).map(Body.event) ?? .other
        } else if let id = try c.decodeIfPresent(RequestID.self, forKey: .id) {
            body = .response(id)
        } else {
            body = .other  // an error with id null: an unreadable line; nothing to route it to
        }
    }
}

/// The final item of a request as its result type, or its error. A free function: in generic code
/// that is not specialized (a caller in another module), `ResponseBody<Value>` costs a metadata
/// lookup, so the paths that need no decoding stay clear of it.
func result<Value: Decodable>(of item: ResponseChannel.Item, as type: Value.Type, method: String) throws -> Value {
    switch item {
    case .event:
        throw SidecarError.invalidResponse(method: method, reason: "an event is not a result")  // never asked
    case .emptyResult:
        if Value.self == EmptyResult.self { return unsafeBitCast(EmptyResult(), to: Value.self) }  // ping: no JSONDecoder
        return try ResponseBody<Value>.decode(Data(#"{"result":{}}"#.utf8), method: method)
    case .response(let line): return try ResponseBody<Value>.decode(line, method: method)
    case .failure(let error): throw error
    }
}

/// A response line decoded as the request's own result type.
struct ResponseBody<Value: Decodable>: Decodable {
    struct ErrorObject: Decodable {
        let code: Int
        let message: String
        let data: JSONValue?
    }

    let result: Result<Value, RPCErrorBox>

    struct RPCErrorBox: Error { let error: ErrorObject }

    enum CodingKeys: String, CodingKey { case result, error }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        if let error = try c.decodeIfPresent(ErrorObject.self, forKey: .error) {
            result = .failure(RPCErrorBox(error: error))
        } else {
            result = .success(try c.decode(Value.self, forKey: .result))
        }
    }

    static func decode(_ line: Data, method: String) throws -> Value {
        let body: ResponseBody
        do {
            body = try sharedDecoder.decode(ResponseBody.self, from: line)
        } catch {
            throw SidecarError.invalidResponse(method: method, reason: "\(error)")
        }
        switch body.result {
        case .success(let value): return value
        case .failure(let box):
            let e = box.error
            throw SidecarError.rpc(RPCError(code: ErrorCode(rawValue: e.code), message: e.message, data: e.data, method: method))
        }
    }
}
