import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The sidecar's stdout, split into lines and passed to `onLine` in order by whichever thread
/// reads it: the dedicated reader thread, or a task waiting for its own answer (the leader).
///
/// Why a waiting task reads for itself: with a reader thread alone, an answer costs two thread
/// wake-ups after the sidecar writes it (the kernel wakes the reader thread, which then resumes
/// the task, whose cooperative thread must be scheduled), where a program reading its own pipe
/// pays one. Each is several µs on a small machine, and 30-50 µs when it must wake an idle vCPU
/// of a VM, against a `ping` round trip of 12-20 µs. So a task that is about to wait
/// (`ResponseChannel.take`) first leads, for at most a short budget: it polls the pipe with
/// non-blocking reads, yielding the CPU in between, and routes every line it reads, its own
/// answer included, exactly as the thread would. Nobody sleeps in the kernel, so the answer
/// needs no wake-up at all; the thread parks while a task leads (it notices when it next
/// wakes), so a task awaiting one request after another has no other thread in the loop.
/// The cost is bounded CPU: one budget per wait, and the budget halves after each miss.
///
/// Rules, all under `condition`'s lock, which also serializes reading and line splitting:
/// - at most one leader; the thread reads only when no task leads;
/// - a leader that stops without its answer, or while requests are still pending (a stream's
///   next events), wakes the thread if it is parked, and so does a task before it parks on a
///   continuation (`ensureReading`), stopping the process, and its exit: whenever someone waits
///   for a line, someone reads;
/// - the descriptor is non-blocking (our end only) and closed only in `deinit`.
final class StdoutReader: @unchecked Sendable {
    private let fd: Int32
    private let onLine: @Sendable (UnsafeRawBufferPointer) -> Void
    private let condition = NSCondition()
    private var splitter = LineSplitter()
    private let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 16)
    private var leading = false  // a task reads; the thread parks when it sees this
    private var parked = false   // the thread waits on `condition`
    private var wanted = false   // the thread must read, leader or not (until it next parks)
    private var exiting = false  // the process exited: the thread reads to the end, never parks
    private var ended = false    // end of file, or a read error: no more lines

    init(fd: Int32, onLine: @escaping @Sendable (UnsafeRawBufferPointer) -> Void) {
        self.fd = fd
        self.onLine = onLine
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)  // our end only: the child writes to the other
    }

    deinit {
        chunk.deallocate()
        close(fd)
    }

    /// The reader thread's loop, until end of file; then the last, unterminated line.
    func run() {
        condition.lock()
        while !ended {
            if leading && !wanted && !exiting {
                parked = true
                condition.wait()
                parked = false
                continue
            }
            wanted = false
            condition.unlock()
            var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            _ = poll(&entry, 1, -1)  // readable, at its end, or EINTR: drain tells
            condition.lock()
            if !leading { drain() }  // else the leader reads, and this thread parks
        }
        splitter.finishBytes(onLine)
        condition.unlock()
    }

    /// Reads as the leader until `ready()` or `budget` ns passed. Nil if another task leads (or
    /// the output ended); else whether `ready()` became true. `stillPending()` (called under the
    /// lock at the end) says whether any request still needs a reader once this task stops.
    func lead(budget: UInt64, ready: () -> Bool, stillPending: () -> Bool) -> Bool? {
        condition.lock()
        guard !leading, !ended else {
            condition.unlock()
            return nil
        }
        leading = true
        var got = drain()  // often the answer is there: the sidecar ran while this thread was preempted in write(2)
        var end = ended
        condition.unlock()
        // Then poll with non-blocking reads, yielding the CPU in between (on a small machine the
        // sidecar needs it). No blocking: being woken by the kernel is the cost avoided here.
        var done = ready()  // also when the thread read the answer just before this task led
        if !done && !end {
            let start = DispatchTime.now().uptimeNanoseconds
            while true {
                if !got {
                    if DispatchTime.now().uptimeNanoseconds &- start >= budget { break }
                    sched_yield()
                }
                condition.lock()
                got = drain()
                end = ended
                condition.unlock()
                if end { break }
                if got, ready() {
                    done = true
                    break
                }
            }
        }
        condition.lock()
        leading = false
        if parked && (!done || ended || exiting || stillPending()) {
            wanted = true
            condition.signal()
        }
        condition.unlock()
        return done
    }

    /// Someone is about to wait without leading: make sure the thread reads.
    func ensureReading() {
        condition.lock()
        if parked && !leading {
            wanted = true
            condition.signal()
        }
        condition.unlock()
    }

    /// The process exited (or is being stopped): the thread drains what is left, to the end.
    func wake() {
        condition.lock()
        exiting = true
        if parked { condition.signal() }
        condition.unlock()
    }

    // ----- helpers (under the lock)

    /// Reads what the pipe holds and passes on its lines; false if it held nothing.
    @discardableResult
    private func drain() -> Bool {
        var got = false
        while !ended {
            let n = read(fd, chunk.baseAddress, chunk.count)
            if n > 0 {
                got = true
                splitter.feedBytes(UnsafeRawBufferPointer(rebasing: chunk[0..<n]), onLine)
                if n < chunk.count { break }  // a short read: the pipe is empty now
            } else if n == 0 {
                ended = true
            } else if errno == EINTR {
                continue
            } else if errno == EAGAIN || errno == EWOULDBLOCK {
                break
            } else {
                ended = true
            }
        }
        return got
    }
}
