import Foundation

/// The mailbox of one request: its events in order, then exactly one final item. Filled by the
/// reader thread, emptied by one consumer; batches keep locking to once per wake-up.
final class ResponseChannel: @unchecked Sendable {
    enum Item: Sendable {
        case event(SidecarEvent)
        case response(Data)
        case failure(any Error)
    }

    let id: RequestID
    let method: String
    private let lock = NSLock()
    private var buffer: [Item] = []
    private var waiter: UnsafeContinuation<[Item], Never>?
    private var closed = false
    private var cancelSent = false
    private var sendCancel: (@Sendable () -> Void)?
    private var timer: Task<Void, Never>?

    init(id: RequestID, method: String, sendCancel: (@Sendable () -> Void)? = nil) {
        self.id = id
        self.method = method
        self.sendCancel = sendCancel
    }

    static func failed(_ error: any Error, id: RequestID, method: String) -> ResponseChannel {
        let channel = ResponseChannel(id: id, method: method)
        channel.push(.failure(error))
        return channel
    }

    /// Adds an item; anything after the final item is dropped.
    func push(_ item: Item) {
        lock.lock()
        guard !closed else { return lock.unlock() }
        if case .event = item {} else {
            closed = true
            timer?.cancel()
            sendCancel = nil
        }
        if let waiter {
            self.waiter = nil
            lock.unlock()
            waiter.resume(returning: [item])
        } else {
            buffer.append(item)
            lock.unlock()
        }
    }

    /// The items so far, waiting for one if there are none; empty once the final item was taken.
    func take() async -> [Item] {
        if let items = takeNow(orWait: nil) { return items }
        return await withUnsafeContinuation { continuation in
            if let items = takeNow(orWait: continuation) { continuation.resume(returning: items) }
        }
    }

    private func takeNow(orWait continuation: UnsafeContinuation<[Item], Never>?) -> [Item]? {
        lock.withLock {
            if !buffer.isEmpty || closed {
                defer { buffer = [] }
                return buffer
            }
            if let continuation { waiter = continuation }
            return nil
        }
    }

    /// Asks the sidecar to cancel (once); the request still ends with its response.
    func cancel() {
        lock.lock()
        let send = cancelSent || closed ? nil : sendCancel
        cancelSent = true
        lock.unlock()
        send?()
    }

    func setTimer(_ task: Task<Void, Never>) {
        lock.lock()
        if closed { task.cancel() } else { timer = task }
        lock.unlock()
    }
}
