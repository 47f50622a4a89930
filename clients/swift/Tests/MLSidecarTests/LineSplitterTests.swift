import Foundation
import Testing
@testable import MLSidecar

@Suite struct LineSplitterTests {
    /// Feeds `chunks` and returns the lines, decoded as UTF-8.
    private func lines(_ chunks: [[UInt8]], finish: Bool = true) -> [String] {
        var splitter = LineSplitter()
        var out: [String] = []
        for chunk in chunks { splitter.feed(chunk) { out.append(String(decoding: $0, as: UTF8.self)) } }
        if finish { splitter.finish { out.append(String(decoding: $0, as: UTF8.self)) } }
        return out
    }

    private func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

    @Test func splitsOnNewlineByteOnly() {
        let text = "a\u{2028}b\u{2029}c\u{85}d\re\n{\"x\":1}\n"
        #expect(lines([bytes(text)]) == ["a\u{2028}b\u{2029}c\u{85}d\re", "{\"x\":1}"])
    }

    @Test func joinsCharactersSplitAcrossChunks() {
        let text = "日本😀\u{2028}é\nnext\n"
        #expect(lines(bytes(text).map { [$0] }) == ["日本😀\u{2028}é", "next"])
        let all = bytes(text)
        for cut in 1..<all.count {
            #expect(lines([Array(all[..<cut]), Array(all[cut...])]) == ["日本😀\u{2028}é", "next"])
        }
    }

    @Test func stripsOneTrailingCarriageReturn() {
        #expect(lines([bytes("x\r\ny\r\r\n")]) == ["x", "y\r"])
    }

    @Test func removesBOMFromFirstLineOnly() {
        let bom: [UInt8] = [0xEF, 0xBB, 0xBF]
        #expect(lines([bom + bytes("a\n") + bom + bytes("b\n")]) == ["a", "\u{FEFF}b"])
        #expect(lines([[0xEF], [0xBB, 0xBF, 0x61], [0x0A]]) == ["a"])
    }

    @Test func skipsBlankLines() {
        #expect(lines([bytes("\n\n \t\r\n a\n\r\n")]) == [" a"])
    }

    @Test func keepsUnterminatedLastLineAtEnd() {
        #expect(lines([bytes("one\ntwo")], finish: false) == ["one"])
        #expect(lines([bytes("one\ntwo")]) == ["one", "two"])
    }

    @Test func handlesManyLinesPerChunk() {
        let text = (0..<1000).map { "{\"seq\":\($0)}\n" }.joined()
        #expect(lines([bytes(text)]) == (0..<1000).map { "{\"seq\":\($0)}" })
    }
}
