//! A TCP proxy on loopback that a test can cut and restore: a network partition between one
//! client (for example an instance manager) and one server (for example the API server). A cut
//! closes the connections (the peers learn of it at once); a black hole holds every byte and
//! answers nothing (the peers learn of it only from their own timeouts), as dropped packets do;
//! stranded connections are black-holed for good while new ones go through (a load balancer or
//! NAT that forgot its connections without a word).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Forwards connections from a free loopback port to `target` until dropped.
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    cut: AtomicBool,
    /// Black-holed: nothing is forwarded, nothing is closed; held bytes go on at the restore.
    hole: AtomicBool,
    stopped: AtomicBool,
    /// Milliseconds each new connection waits before it reaches the target.
    latency_ms: AtomicU64,
    /// Number of the next connection accepted.
    next_connection: AtomicU64,
    /// Connections numbered below it are stranded: they forward nothing, ever.
    stranded_below: AtomicU64,
    open: Mutex<Vec<TcpStream>>,
}

impl TcpProxy {
    /// Starts forwarding to `target`.
    pub fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State::default());
        let accept_state = state.clone();
        thread::spawn(move || {
            for incoming in listener.incoming() {
                if accept_state.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = incoming else { continue };
                let number = accept_state.next_connection.fetch_add(1, Ordering::SeqCst);
                if accept_state.cut.load(Ordering::SeqCst) {
                    // Partitioned: the connection dies at once.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let state = accept_state.clone();
                // A thread per connection, so that a slow start delays only its own connection.
                thread::spawn(move || {
                    state.wait_to_forward(number);
                    let latency = state.latency_ms.load(Ordering::SeqCst);
                    if latency > 0 {
                        thread::sleep(Duration::from_millis(latency));
                    }
                    let Ok(server) = TcpStream::connect(target) else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone())
                        && let Ok(mut open) = state.open.lock()
                    {
                        open.push(a);
                        open.push(b);
                    }
                    pipe(&client, &server, state.clone(), number);
                    pipe(&server, &client, state, number);
                });
            }
        });
        Ok(Self { port, state })
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Partitions: closes every open connection and refuses new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        if let Ok(mut open) = self.state.open.lock() {
            for stream in open.drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Makes every new connection wait `latency` before it is forwarded (a slow, far-away
    /// server); zero turns it off.
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    /// Partitions without a word: open connections stay open and forward nothing, new ones are
    /// accepted and never reach the target, until [`Self::restore`] (then held bytes go on).
    pub fn black_hole(&self) {
        self.state.hole.store(true, Ordering::SeqCst);
    }

    /// Strands every open connection: it stays open and forwards nothing from now on, while
    /// connections opened later go through. Peers learn of it only from their own timeouts.
    pub fn strand(&self) {
        let next = self.state.next_connection.load(Ordering::SeqCst);
        self.state.stranded_below.store(next, Ordering::SeqCst);
    }

    /// Heals the partition (stranded connections stay stranded).
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.state.hole.store(false, Ordering::SeqCst);
    }
}

impl State {
    /// Returns once connection `number` may forward: the proxy is not black-holed and the
    /// connection not stranded (or the proxy is stopped).
    fn wait_to_forward(&self, number: u64) {
        while (self.hole.load(Ordering::SeqCst)
            || number < self.stranded_below.load(Ordering::SeqCst))
            && !self.stopped.load(Ordering::SeqCst)
        {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn pipe(from: &TcpStream, to: &TcpStream, state: Arc<State>, number: u64) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    state.wait_to_forward(number);
                    if to.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so that its thread ends.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
