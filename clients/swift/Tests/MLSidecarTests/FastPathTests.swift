import Foundation
import Testing
@testable import MLSidecar

@Suite struct FastPathTests {
    private func token(_ line: String) -> TokenEvent? { tokenEvent(Data(line.utf8)) }

    @Test func readsTokenLinesAsJSONDecoderWould() throws {
        let texts = ["tok ", "", "h\u{e9}llo \u{1F98A} \u{2028}\u{2029}\u{85}", "a\"b\\c/d\n\r\t\u{8}\u{c}", "日本語"]
        for text in texts {
            let params = String(decoding: try JSONEncoder().encode(["text": text]), as: UTF8.self)
            let ascii = params.unicodeScalars.map { $0.isASCII ? String($0) : $0.utf16.map { String(format: "\\u%04x", $0) }.joined() }.joined()
            let body = ascii.dropFirst(#"{"text":"#.count).dropLast()
            let line = #"{"jsonrpc":"2.0","method":"$/token","params":{"id":12,"seq":345,"text":"# + body + "}}"
            let fast = try #require(token(line), "no fast path for \(line)")
            #expect(fast == TokenEvent(id: 12, seq: 345, text: text))
            guard case .event(.token(let slow)) = try JSONDecoder().decode(IncomingMessage.self, from: Data(line.utf8)).body
            else { Issue.record("not a token"); continue }
            #expect(fast == slow)
        }
    }

    @Test func leavesOtherShapesToJSONDecoder() {
        #expect(token(#"{"jsonrpc":"2.0","method":"$/token","params":{"id":"a","seq":0,"text":"x"}}"#) == nil)
        #expect(token(#"{"jsonrpc":"2.0","method":"$/token","params":{"seq":0,"id":1,"text":"x"}}"#) == nil)
        #expect(token(#"{"jsonrpc":"2.0","method":"$/token","params":{"id":1,"seq":0,"text":"\ud800"}}"#) == nil)
        #expect(token(#"{"jsonrpc":"2.0","method":"$/token","params":{"id":1,"seq":0,"text":"x"}} "#) == nil)
        #expect(token(#"{"jsonrpc": "2.0", "method": "$/token", "params": {"id": 1, "seq": 0, "text": "x"}}"#) == nil)
        #expect(responseID(Data(#"{"jsonrpc":"2.0","id":42,"result":{}}"#.utf8)) == 42)
        #expect(responseID(Data(#"{"jsonrpc":"2.0","id":"a","result":{}}"#.utf8)) == nil)
        #expect(responseID(Data(#"{"jsonrpc":"2.0","id":null,"error":{}}"#.utf8)) == nil)
        #expect(isEmptyResult(Data(#"{"jsonrpc":"2.0","id":42,"result":{}}"#.utf8)))
        #expect(!isEmptyResult(Data(#"{"jsonrpc":"2.0","id":42,"result":{"a":1}}"#.utf8)))
        #expect(!isEmptyResult(Data(#"{"jsonrpc":"2.0","id":42,"result":{}} "#.utf8)))
        #expect(!isEmptyResult(Data(#"{"jsonrpc":"2.0","id":"a","result":{}}"#.utf8)))
    }

    /// The hand-written request line says what JSONEncoder said, for any method name and params.
    @Test func requestFramesMatchJSONEncoder() throws {
        struct Reference<Params: Encodable>: Encodable {
            let jsonrpc = "2.0"
            let id: RequestID?
            let method: String
            let params: Params?
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = .withoutEscapingSlashes
        func check<Params: Encodable>(_ id: RequestID?, _ method: String, _ params: Params?) throws {
            let frame = try requestFrame(id: id, method: method, params: params, encoder: encoder)
            #expect(frame.last == 0x0A && !frame.dropLast().contains(0x0A))
            let ours = try JSONDecoder().decode(JSONValue.self, from: Data(frame.dropLast()))
            let theirs = try JSONDecoder().decode(JSONValue.self, from: encoder.encode(Reference(id: id, method: method, params: params)))
            #expect(ours == theirs, "\(String(decoding: frame, as: UTF8.self))")
        }
        try check(.int(7), "ping", Empty())
        try check(.int(-12), "debug/stream", DebugStreamParams(count: 3, text: "a\"b\\c/\n\u{1}é😀"))
        let value: JSONValue = ["x": [1, "y", nil]]
        try check(.int(Int.max), "we\"ird\\method\u{7f}\t/é", value)
        try check(.string("s-1"), "$/cancel", CancelParams(id: 5))
        try check(nil, "notify", Empty?.none)
        try check(.int(3), "x", JSONValue?.none)
        #expect(String(decoding: try requestFrame(id: .int(7), method: "ping", params: Empty(), encoder: encoder), as: UTF8.self)
                == #"{"jsonrpc":"2.0","id":7,"method":"ping","params":{}}"# + "\n")
    }
}
