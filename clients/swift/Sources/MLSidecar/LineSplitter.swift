import Foundation

/// Splits a byte stream into NDJSON lines the way the protocol says: on byte 0x0A only (U+2028 and
/// friends are ordinary characters), one trailing `\r` removed, blank lines skipped, a UTF-8 BOM
/// removed from the first line. Bytes are never decoded here, so a character split across two
/// reads is simply joined again.
public struct LineSplitter: Sendable {
    private var partial: [UInt8] = []
    private var isFirstLine = true

    public init() {}

    /// Feeds one chunk; calls `emit` for every line it completes.
    public mutating func feed(_ chunk: UnsafeRawBufferPointer, _ emit: (Data) -> Void) {
        feedBytes(chunk) { emit(Data($0)) }
    }

    /// The same, lending each line's bytes (valid during the call): the reader thread copies only
    /// the lines it keeps.
    mutating func feedBytes(_ chunk: UnsafeRawBufferPointer, _ emit: (UnsafeRawBufferPointer) -> Void) {
        guard let base = chunk.baseAddress else { return }
        var start = 0
        while start < chunk.count, let hit = memchr(base + start, 0x0A, chunk.count - start) {
            let end = base.distance(to: UnsafeRawPointer(hit))
            let first = isFirstLine
            isFirstLine = false
            if partial.isEmpty {
                Self.emitLine(UnsafeRawBufferPointer(rebasing: chunk[start..<end]), first: first, emit)
            } else {
                partial.append(contentsOf: chunk[start..<end])
                partial.withUnsafeBytes { Self.emitLine($0, first: first, emit) }
                partial.removeAll(keepingCapacity: true)
            }
            start = end + 1
        }
        if start < chunk.count { partial.append(contentsOf: chunk[start...]) }
    }

    public mutating func feed(_ bytes: [UInt8], _ emit: (Data) -> Void) {
        bytes.withUnsafeBytes { feed($0, emit) }
    }

    /// End of input: an unterminated last line still counts.
    public mutating func finish(_ emit: (Data) -> Void) {
        finishBytes { emit(Data($0)) }
    }

    mutating func finishBytes(_ emit: (UnsafeRawBufferPointer) -> Void) {
        guard !partial.isEmpty else { return }
        let first = isFirstLine
        isFirstLine = false
        partial.withUnsafeBytes { Self.emitLine($0, first: first, emit) }
        partial = []
    }

    private static func emitLine(_ line: UnsafeRawBufferPointer, first: Bool, _ emit: (UnsafeRawBufferPointer) -> Void) {
        var bytes = line[...]
        if first, bytes.starts(with: [0xEF, 0xBB, 0xBF]) { bytes = bytes.dropFirst(3) }
        if bytes.last == 0x0D { bytes = bytes.dropLast() }
        guard bytes.contains(where: { $0 != 0x20 && $0 != 0x09 && $0 != 0x0D }) else { return }
        emit(UnsafeRawBufferPointer(rebasing: bytes))
    }
}
