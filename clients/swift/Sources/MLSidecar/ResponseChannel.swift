import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The mailbox of one request: its events in order, then exactly one final item. Filled by the
/// reader (thread or leading task), emptied by one consumer; batches keep locking to once per
/// wake-up. Its lock is its connection's (one lock for the pending table and all its mailboxes:
/// routing a line takes it once, and a request allocates no lock of its own).
final class ResponseChannel: @unchecked Sendable {
    enum Item: Sendable {
        case event(SidecarEvent)
        /// `"result":{}` (ping's answer), passed on without a copy of the line.
        case emptyResult
        case response(Data)
        case failure(any Error)

        var isFinal: Bool { if case .event = self { false } else { true } }
    }

    let id: RequestID
    let method: String
    private let lock: NSLock
    private var buffer: [Item] = []
    private var waiter: UnsafeContinuation<[Item], Never>?
    private var closed = false
    private var cancelSent = false
    private weak var connection: Connection?
    private var timer: Task<Void, Never>?
    // Touched by the consumer only (one at a time, in sequence).
    private var leadBudget = ResponseChannel.leadBudget
    private var consumed = false

    init(id: RequestID, method: String, connection: Connection? = nil, lock: NSLock = NSLock()) {
        self.id = id
        self.method = method
        self.connection = connection
        self.lock = lock
    }

    static func failed(_ error: any Error, id: RequestID, method: String) -> ResponseChannel {
        let channel = ResponseChannel(id: id, method: method)
        channel.push(.failure(error))
        return channel
    }

    /// Adds an item; anything after the final item is dropped.
    func push(_ item: Item) {
        lock.lock()
        let resume = pushLocked(item)
        lock.unlock()
        resume?()
    }

    /// The same with the lock held: what to call once it is released (a parked consumer to resume).
    func pushLocked(_ item: Item) -> (() -> Void)? {
        guard !closed else { return nil }
        if item.isFinal {
            closed = true
            timer?.cancel()
            timer = nil
        }
        guard let waiter else {
            buffer.append(item)
            return nil
        }
        self.waiter = nil
        return { waiter.resume(returning: [item]) }
    }

    /// The items so far, waiting for one if there are none; empty once the final item was taken.
    /// Cancelling the waiting task asks the sidecar to cancel, and the wait goes on for its answer.
    func take() async -> [Item] {
        if let items = takeNow(orWait: nil) ?? lead() {
            if Task.isCancelled { cancel() }  // as the handler below would have
            return taken(items)
        }
        let items = await withTaskCancellationHandler {
            await withUnsafeContinuation { continuation in
                if let items = takeNow(orWait: continuation) {
                    continuation.resume(returning: items)
                } else {
                    connection?.process.stdout.ensureReading()
                }
            }
        } onCancel: {
            cancel()
        }
        return taken(items)
    }

    private func taken(_ items: [Item]) -> [Item] {
        if items.last?.isFinal ?? true { consumed = true }
        return items
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

    /// Before parking, read the pipe for up to `leadBudget` (see `StdoutReader`): a quick answer
    /// then reaches this task with no thread hand-off. Bounded: each wait that times out halves
    /// the budget for this request's later waits (a slow stream soon stops leading; a long
    /// request blocks its thread in `select` for one budget, 100 µs, once).
    static let leadBudget: UInt64 = 100_000  // ns

    private func lead() -> [Item]? {
        guard leadBudget >= 2_000, let connection else { return nil }
        var items: [Item]?
        let outcome = connection.process.stdout.lead(budget: leadBudget, ready: {
            items = takeNow(orWait: nil)
            return items != nil
        }, stillPending: { connection.hasPending })
        if outcome == false { leadBudget /= 2 }
        return items
    }

    /// Asks the sidecar to cancel (once); the request still ends with its response.
    func cancel() {
        lock.lock()
        let send = !cancelSent && !closed
        cancelSent = true
        lock.unlock()
        if send { connection?.cancel(id) }
    }

    /// The last copy of the request's stream is gone: cancel it, unless its end was taken.
    func dropped() {
        if !consumed { cancel() }
    }

    func setTimer(_ task: Task<Void, Never>) {
        lock.lock()
        if closed { task.cancel() } else { timer = task }
        lock.unlock()
    }
}
