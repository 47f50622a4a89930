import Foundation

/// One running sidecar: its process and the table of requests waiting for an answer.
final class Connection: @unchecked Sendable {
    let process: ChildProcess
    private let lock = NSLock()
    private var pending: [Int: ResponseChannel] = [:]  // this client's ids are integers
    private var nextID = 1
    private var exitValue: ProcessExit?
    private var messageLimit = 16 * 1024 * 1024
    private let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .withoutEscapingSlashes
        return encoder
    }()

    init(_ configuration: SidecarConfiguration) throws {
        let router = Router()
        process = try ChildProcess(configuration, onLine: { router.connection?.receive($0) },
                                   onExit: { router.connection?.exited($0) })
        router.connection = self
        // A process that died at once may have reported it before the router was set.
        if let exit = process.exit { exited(exit) }
    }

    deinit { process.closeInput() }

    var exit: ProcessExit? { lock.withLock { exitValue } }
    var hasPending: Bool { lock.withLock { !pending.isEmpty } }
    var maxMessageBytes: Int {
        get { lock.withLock { messageLimit } }
        set { lock.withLock { messageLimit = newValue } }
    }

    /// Sends a request; its answer arrives through the returned channel.
    func start<Params: Encodable>(_ method: String, params: Params?, timeout: Duration?) -> ResponseChannel {
        let number = lock.withLock {
            defer { nextID += 1 }
            return nextID
        }
        let id = RequestID.int(number)
        let line: [UInt8]
        do {
            line = try requestFrame(id: id, method: method, params: params, encoder: encoder)
        } catch {
            return .failed(error, id: id, method: method)
        }
        let channel = ResponseChannel(id: id, method: method, connection: self, lock: lock)
        let refusal: SidecarError? = lock.withLock {
            if let exitValue { return .processExited(exitValue) }
            if line.count - 1 > messageLimit {
                return .messageTooLarge(method: method, bytes: line.count - 1, limit: messageLimit)
            }
            pending[number] = channel
            return nil
        }
        if let refusal { return .failed(refusal, id: id, method: method) }
        if let timeout {
            channel.setTimer(Task { [weak self, weak channel] in
                try? await Task.sleep(for: timeout)
                guard !Task.isCancelled, let channel else { return }
                self?.timedOut(channel, after: timeout)
            })
        }
        do {
            try process.write(line, method: method)
        } catch {
            // EPIPE mostly means the process is exiting, and its exit status and stderr say more:
            // if it exits soon, `exited` fails the request with them.
            Task { [weak self] in
                guard let self, await process.waitForExit(timeout: .seconds(1)) == nil else { return }
                finish(number, with: .failure(error))
            }
        }
        return channel
    }

    func notify<Params: Encodable>(_ method: String, params: Params?) throws {
        try process.write(try requestFrame(id: nil, method: method, params: params, encoder: encoder), method: method)
    }

    // ----- called by the reader thread

    private let decoder = JSONDecoder()

    private func receive(_ bytes: UnsafeRawBufferPointer) {
        if let id = responseID(bytes) { return finish(id, with: isEmptyResult(bytes) ? .emptyResult : .response(Data(bytes))) }
        if let token = tokenEvent(bytes) { return route(.token(token)) }
        let line = Data(bytes)
        guard let message = try? decoder.decode(IncomingMessage.self, from: line) else { return }
        switch message.body {
        case .event(let event):
            route(event)
        case .response(.int(let id)):
            finish(id, with: .response(line))
        case .response, .other:
            break  // a string id is none of ours
        }
    }

    /// Every request still waiting fails with the exit status and the stderr tail.
    private func exited(_ exit: ProcessExit) {
        let waiting: [ResponseChannel] = lock.withLock {
            exitValue = exit
            defer { pending = [:] }
            return Array(pending.values)
        }
        for channel in waiting { channel.push(.failure(SidecarError.processExited(exit))) }
    }

    // ----- helpers

    private func route(_ event: SidecarEvent) {
        guard case .int(let id) = event.requestID else { return }
        lock.lock()
        let resume = pending[id]?.pushLocked(.event(event))
        lock.unlock()
        resume?()
    }

    private func finish(_ id: Int, with item: ResponseChannel.Item) {
        lock.lock()
        let resume = pending.removeValue(forKey: id)?.pushLocked(item)
        lock.unlock()
        resume?()
    }

    func cancel(_ id: RequestID) {
        try? notify("$/cancel", params: CancelParams(id: id))
    }

    private func timedOut(_ channel: ResponseChannel, after timeout: Duration) {
        channel.cancel()
        guard case .int(let id) = channel.id else { return }
        finish(id, with: .failure(SidecarError.timeout(method: channel.method, after: timeout)))
    }

    /// Lets the process's callbacks reach the connection without keeping it alive.
    private final class Router: @unchecked Sendable {
        weak var connection: Connection?
    }
}
