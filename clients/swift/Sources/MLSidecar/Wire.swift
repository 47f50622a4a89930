import Foundation

/// JSONDecoder is thread-safe; one instance saves an allocation per response.
let sharedDecoder = JSONDecoder()

/// A request or notification as written to the sidecar.
struct OutgoingMessage<Params: Encodable>: Encodable {
    let jsonrpc = "2.0"
    let id: RequestID?
    let method: String
    let params: Params?

    enum CodingKeys: String, CodingKey { case jsonrpc, id, method, params }
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
