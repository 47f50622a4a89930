import Foundation

/// The baseline: the same child process and pipes with no client layer; lines are written and
/// read directly on the calling thread (blocking read(2) into one reused buffer), and not parsed.
final class RawSidecar {
    private let process = Process()
    private let input = Pipe(), output = Pipe()
    private var buffer: [UInt8] = []
    private var start = 0
    private let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 16)

    init(_ arguments: [String], environment: [String: String]) throws {
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        process.environment = environment
        process.standardInput = input
        process.standardOutput = output
        try process.run()
    }

    deinit { chunk.deallocate() }

    func send(_ line: String) {
        var line = line
        line.withUTF8 { bytes in
            var offset = 0
            while offset < bytes.count {
                let n = write(input.fileHandleForWriting.fileDescriptor, bytes.baseAddress! + offset, bytes.count - offset)
                precondition(n > 0, "write to the sidecar failed")
                offset += n
            }
        }
    }

    /// The next line, or nil at end of output.
    func readLine() -> ArraySlice<UInt8>? {
        while true {
            if let newline = buffer[start...].firstIndex(of: 0x0A) {
                defer { start = newline + 1 }
                return buffer[start..<newline]
            }
            buffer.removeFirst(start)
            start = 0
            let n = read(output.fileHandleForReading.fileDescriptor, chunk.baseAddress, chunk.count)
            if n <= 0 { return nil }
            buffer.append(contentsOf: UnsafeRawBufferPointer(rebasing: chunk[..<n]))
        }
    }

    private var nextID = 0

    func initialize(_ version: String) {
        send(#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"\#(version)"}}"# + "\n")
        _ = readLine()
    }

    /// The median round trip of `count` pings, in seconds.
    func pingRun(_ count: Int) -> Double {
        var times: [Double] = []
        times.reserveCapacity(count)
        for _ in 0..<count {
            nextID += 1
            let frame = #"{"jsonrpc":"2.0","id":\#(nextID),"method":"ping"}"# + "\n"  // made before the clock starts, as bench/protocol.py does
            let start = ContinuousClock.now
            send(frame)
            _ = readLine()
            times.append(seconds(ContinuousClock.now - start))
        }
        return median(times)
    }

    /// `$/token` lines per second from one debug/stream request.
    func tokenRun(_ count: Int) -> Double {
        nextID += 1
        let start = ContinuousClock.now
        send(#"{"jsonrpc":"2.0","id":\#(nextID),"method":"debug/stream","params":{"count":\#(count)}}"# + "\n")
        var lines = 0
        let response = Array(#"{"jsonrpc":"2.0","id""#.utf8)
        while let line = readLine(), !line.starts(with: response) { lines += 1 }
        precondition(lines == count, "raw: got \(lines) of \(count) tokens")
        return Double(count) / seconds(ContinuousClock.now - start)
    }

    func close() {
        try? input.fileHandleForWriting.close()
        process.waitUntilExit()
    }
}
