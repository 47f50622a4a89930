import Foundation

/// JSONDecoder is thread-safe; one instance saves an allocation per response.
let sharedDecoder = JSONDecoder()

/// The line of a request (`id` set) or notification, newline included. The envelope is written
/// by hand: JSONEncoder costs microseconds a call on Linux, a large share of a 12 µs `ping` round
/// trip. Params still go through JSONEncoder, except `Empty` (`{}`) and nil (left out), so every
/// typed params struct is encoded exactly as before. Field order as JSONEncoder wrote it.
func requestFrame<Params: Encodable>(id: RequestID?, method: String, params: Params?,
                                     encoder: @autoclosure () -> JSONEncoder) throws -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(80 + method.utf8.count)
    append(#"{"jsonrpc":"2.0""#, to: &out)
    if let id {
        append(#","id":"#, to: &out)
        switch id {
        case .int(let value): appendDecimal(value, to: &out)
        case .string(let value): appendJSONString(value, to: &out)
        }
    }
    append(#","method":"#, to: &out)
    appendJSONString(method, to: &out)
    if let params {
        append(#","params":"#, to: &out)
        if params is Empty {
            append("{}", to: &out)
        } else {
            out.append(contentsOf: try encoder().encode(params))
        }
    }
    append("}\n", to: &out)
    return out
}

private func append(_ literal: StaticString, to out: inout [UInt8]) {
    out.append(contentsOf: UnsafeBufferPointer(start: literal.utf8Start, count: literal.utf8CodeUnitCount))
}

private func appendDecimal(_ value: Int, to out: inout [UInt8]) {
    if value < 0 { out.append(UInt8(ascii: "-")) }
    var magnitude = value.magnitude
    withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 20) { digits in  // UInt64.max has 20
        var index = digits.count
        repeat {
            index -= 1
            digits[index] = UInt8(ascii: "0") + UInt8(magnitude % 10)
            magnitude /= 10
        } while magnitude > 0
        out.append(contentsOf: digits[index...])
    }
}

/// A JSON string: quotes, backslashes and control characters escaped, everything else as UTF-8
/// (slashes unescaped, as `.withoutEscapingSlashes` wrote them).
func appendJSONString(_ string: String, to out: inout [UInt8]) {
    out.append(UInt8(ascii: "\""))
    var string = string
    string.withUTF8 { bytes in
        guard bytes.contains(where: { $0 < 0x20 || $0 == UInt8(ascii: "\"") || $0 == UInt8(ascii: "\\") }) else {
            return out.append(contentsOf: bytes)  // the usual case: nothing to escape
        }
        for byte in bytes {
            switch byte {
            case UInt8(ascii: "\""): append(#"\""#, to: &out)
            case UInt8(ascii: "\\"): append(#"\\"#, to: &out)
            case 0x0A: append(#"\n"#, to: &out)
            case 0x0D: append(#"\r"#, to: &out)
            case 0x09: append(#"\t"#, to: &out)
            case 0..<0x20:
                let hex: StaticString = "0123456789abcdef"
                append(#"\u00"#, to: &out)
                out.append(hex.utf8Start[Int(byte >> 4)])
                out.append(hex.utf8Start[Int(byte & 0xF)])
            default: out.append(byte)
            }
        }
    }
    out.append(UInt8(ascii: "\""))
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
