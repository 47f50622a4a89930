import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Writing to a pipe whose reader is gone must raise EPIPE, not kill this process.
private let ignoreSIGPIPE: Void = { _ = signal(SIGPIPE, SIG_IGN) }()
private let spawnLock = NSLock()

/// The sidecar process: three pipes, a reader thread per output (on stdout shared with a waiting
/// task, see `StdoutReader`), one serialized writer, and a stderr tail. `onExit` runs once, after
/// the process ended and its output drained.
final class ChildProcess: @unchecked Sendable {
    let stderr: ByteTail
    let stdout: StdoutReader
    private let process = Process()
    private let stdinFD: Int32
    private let writeLock = NSLock()
    private var stdinOpen = true
    private let exitLock = NSLock()
    private var exitValue: ProcessExit?

    var pid: Int32 { process.processIdentifier }
    var exit: ProcessExit? { exitLock.withLock { exitValue } }

    init(_ configuration: SidecarConfiguration, onLine: @escaping @Sendable (UnsafeRawBufferPointer) -> Void,
         onExit: @escaping @Sendable (ProcessExit) -> Void) throws {
        _ = ignoreSIGPIPE
        spawnLock.lock()
        defer { spawnLock.unlock() }
        let input = try Self.pipe(), output = try Self.pipe(), errors = try Self.pipe()
        stdinFD = input.write
        stderr = ByteTail(limit: configuration.stderrTailBytes)
        stdout = StdoutReader(fd: output.read, onLine: onLine)  // closes output.read when it goes
        process.executableURL = configuration.executableURL
        process.arguments = configuration.arguments
        if let environment = configuration.environment { process.environment = environment }
        if let directory = configuration.workingDirectory { process.currentDirectoryURL = directory }
        process.standardInput = FileHandle(fileDescriptor: input.read, closeOnDealloc: false)
        process.standardOutput = FileHandle(fileDescriptor: output.write, closeOnDealloc: false)
        process.standardError = FileHandle(fileDescriptor: errors.write, closeOnDealloc: false)

        let stdoutDone = DispatchSemaphore(value: 0), stderrDone = DispatchSemaphore(value: 0)
        process.terminationHandler = { [stderr, stdout] process in
            // Lines written just before the exit are still in the pipe: let the readers finish,
            // but do not wait for a grandchild that may hold the pipes open.
            stdout.wake()
            DispatchQueue.global().async { [self] in
                _ = stdoutDone.wait(timeout: .now() + 1)
                _ = stderrDone.wait(timeout: .now() + 0.5)
                let exit = ProcessExit(status: process.terminationStatus,
                                       signaled: process.terminationReason == .uncaughtSignal,
                                       stderrTail: stderr.text)
                exitLock.withLock { exitValue = exit }
                onExit(exit)
                process.terminationHandler = nil  // it holds self
            }
        }
        do {
            try runWithEmptySignalMask()
        } catch {
            for fd in [input.read, input.write, output.write, errors.read, errors.write] { close(fd) }
            throw SidecarError.launchFailed("\(configuration.executableURL.path) \(configuration.arguments.joined(separator: " ")): \(error)")
        }
        for fd in [input.read, output.write, errors.write] { close(fd) }

        Thread.detachNewThread { [stdout] in
            stdout.run()
            stdoutDone.signal()
        }
        let onStderrLine = configuration.onStderrLine
        Self.readChunks(errors.read, done: stderrDone) { [stderr] chunk, splitter in
            stderr.append(chunk)
            if let onStderrLine {
                splitter.feed(chunk) { onStderrLine(String(decoding: $0, as: UTF8.self)) }
            }
        }
    }

    /// Writes one whole message; frames never interleave.
    func write(_ data: [UInt8], method: String) throws {
        try writeLock.withLock {
            guard stdinOpen else { throw SidecarError.writeFailed(errno: EPIPE, method: method) }
            try data.withUnsafeBytes { buffer in
                var offset = 0
                while offset < buffer.count {
                    let n = Foundation.write(stdinFD, buffer.baseAddress! + offset, buffer.count - offset)
                    if n >= 0 { offset += n; continue }
                    if errno == EINTR { continue }
                    throw SidecarError.writeFailed(errno: errno, method: method)
                }
            }
        }
    }

    /// Closing stdin tells the sidecar to finish up and exit.
    func closeInput() {
        writeLock.withLock {
            if stdinOpen { close(stdinFD) }
            stdinOpen = false
        }
    }

    func send(signal: Int32) {
        if exit == nil && process.isRunning { kill(pid, signal) }  // never a reaped, reused pid
    }

    /// Close stdin and wait; then SIGTERM, then SIGKILL. How it ended, unless it outlived all that.
    func stop(grace: Duration) async -> ProcessExit? {
        closeInput()
        stdout.wake()  // the sidecar may be blocked writing to a full pipe that no task reads
        if let exit = await waitForExit(timeout: grace) { return exit }
        send(signal: SIGTERM)
        if let exit = await waitForExit(timeout: .seconds(3)) { return exit }
        send(signal: SIGKILL)
        return await waitForExit(timeout: .seconds(5))
    }

    /// The exit, once the process ended and its output drained; nil after `timeout`.
    func waitForExit(timeout: Duration) async -> ProcessExit? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let exit { return exit }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return exit
    }

    // ----- helpers

    /// The child inherits the spawning thread's signal mask, and Swift concurrency's threads block
    /// nearly every signal: spawned from one, the sidecar would ignore SIGTERM and SIGINT. So spawn
    /// from a fresh thread that blocks none.
    private func runWithEmptySignalMask() throws {
        let done = DispatchSemaphore(value: 0)
        let failure = LockedValue<(any Error)?>(nil)
        Thread.detachNewThread { [self] in
            var none = sigset_t()
            sigemptyset(&none)
            pthread_sigmask(SIG_SETMASK, &none, nil)
            do { try process.run() } catch { failure.value = error }
            done.signal()
        }
        done.wait()
        if let error = failure.value { throw error }
    }

    private static func pipe() throws -> (read: Int32, write: Int32) {
        var fds: [Int32] = [0, 0]
        // Close-on-exec, so that a second sidecar does not inherit this one's pipes (its stdin
        // would then never see end of input). Spawns hold `spawnLock`, so none happens in between.
        let rc = Foundation.pipe(&fds)
        if rc == 0 { for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) } }
        guard rc == 0 else { throw SidecarError.launchFailed("pipe(): \(String(cString: strerror(errno)))") }
        return (fds[0], fds[1])
    }

    /// A dedicated thread doing blocking read(2) until end of file.
    private static func readChunks(_ fd: Int32, done: DispatchSemaphore,
                                   _ onChunk: @escaping @Sendable (UnsafeRawBufferPointer, inout LineSplitter) -> Void) {
        Thread.detachNewThread {
            var splitter = LineSplitter()
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 16)
            defer { buffer.deallocate(); close(fd); done.signal() }
            while true {
                let n = read(fd, buffer.baseAddress, buffer.count)
                if n > 0 {
                    onChunk(UnsafeRawBufferPointer(rebasing: buffer[0..<n]), &splitter)
                } else if n < 0 && errno == EINTR {
                    continue
                } else {
                    break
                }
            }
        }
    }
}

final class LockedValue<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value
    init(_ value: Value) { stored = value }
    var value: Value {
        get { lock.withLock { stored } }
        set { lock.withLock { stored = newValue } }
    }
}

/// The last `limit` bytes of a stream.
final class ByteTail: @unchecked Sendable {
    private let lock = NSLock()
    private var bytes: [UInt8] = []
    private let limit: Int

    init(limit: Int) { self.limit = max(0, limit) }

    func append(_ chunk: UnsafeRawBufferPointer) {
        lock.withLock {
            bytes.append(contentsOf: chunk)
            if bytes.count > 2 * limit { bytes.removeFirst(bytes.count - limit) }
        }
    }

    var text: String { lock.withLock { String(decoding: bytes.suffix(limit), as: UTF8.self) } }
}
