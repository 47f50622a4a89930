import Foundation
import Testing
@testable import MLSidecar

@Suite struct CodableTests {
    private func json(_ value: some Encodable) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    private func decode<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
        try JSONDecoder().decode(T.self, from: Data(text.utf8))
    }

    @Test func absentAndNullStayApart() throws {
        #expect(try json(TrainParams(model: "m")) == #"{"model":"m"}"#)
        #expect(try json(TrainParams(maxSteps: .some(nil), model: "m")) == #"{"max_steps":null,"model":"m"}"#)
        #expect(try json(TrainParams(data: "d.jsonl", maxSteps: 3, preset: .quick)) == #"{"data":"d.jsonl","max_steps":3,"preset":"quick"}"#)
        #expect(try json(GenerateParams(model: "m", maxTokens: 5, prompt: "hi")) == #"{"max_tokens":5,"model":"m","prompt":"hi"}"#)
    }

    @Test func unionsEncodeAndDecodeEachBranch() throws {
        #expect(try json(EmbedParams(model: "m", input: "one")) == #"{"input":"one","model":"m"}"#)
        #expect(try json(EmbedParams(model: "m", input: ["a", "b"])) == #"{"input":["a","b"],"model":"m"}"#)
        #expect(try decode(GenerateParams.KeepAlive.self, "5") == .int(5))
        #expect(try decode(GenerateParams.KeepAlive.self, "2.5") == .double(2.5))
        #expect(try decode(GenerateParams.KeepAlive.self, #""5m""#) == .string("5m"))
        #expect(try json(TrainParams(targetModules: .allLinear)) == #"{"target_modules":"all-linear"}"#)
        let ref = TrainParams(data: .datasetRef(DatasetRef(path: "x.csv", fileType: .csv)))
        #expect(try json(ref) == #"{"data":{"file_type":"csv","path":"x.csv"}}"#)
        #expect(try decode(RequestID.self, "7") == 7)
        #expect(try decode(RequestID.self, #""a""#) == "a")
    }

    @Test func openEnumsAcceptNewValues() throws {
        let known = try decode(LogEvent.self, #"{"id":1,"level":"warning","message":"m"}"#)
        #expect(known.level == .warning)
        let unknown = try decode(LogEvent.self, #"{"id":"x","level":"fatal","message":"m"}"#)
        #expect(unknown.level.rawValue == "fatal" && unknown.id == "x")
        #expect(ErrorCode.cancelled.rawValue == -32800 && ErrorKind.modelNotFound.rawValue == "model_not_found")
    }

    @Test func optionalResultFieldsDecodeWhenLeftOut() throws {
        let event = try decode(ProgressEvent.self, #"{"id":3,"stage":"train","step":2,"metrics":{"loss":1.5}}"#)
        #expect(event.step == 2 && event.total == nil && event.metrics?["loss"] == 1.5)
    }

    @Test func jsonValueRoundTrips() throws {
        let text = #"{"a":[1,2.5,"x",true,null],"b":{"c":"日本\u2028"}}"#
        let value = try decode(JSONValue.self, text)
        #expect(value["a"]?[0] == .int(1) && value["a"]?[1]?.doubleValue == 2.5 && value["a"]?[4]?.isNull == true)
        #expect(value["b"]?["c"]?.stringValue == "日本\u{2028}")
        #expect(try decode(JSONValue.self, try json(value)) == value)
        let object: JSONValue = ["prompt_tokens": 2, "completion_tokens": 3]
        let usage: Usage = try object.decode()
        #expect(usage.completionTokens == 3)
    }

    @Test func eventsDecodeByMethod() throws {
        let line = #"{"jsonrpc":"2.0","method":"$/token","params":{"id":5,"seq":0,"text":"\ud83e\udd8a"}}"#
        let message = try decode(IncomingMessage.self, line)
        guard case .event(.token(let token)) = message.body else { Issue.record("not a token event"); return }
        #expect(token.text == "🦊" && token.id == 5)
        guard case .response(let id) = try decode(IncomingMessage.self, #"{"jsonrpc":"2.0","id":"r","result":{}}"#).body
        else { Issue.record("not a response"); return }
        #expect(id == "r")
    }
}
