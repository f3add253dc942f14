//! What the two throughput floors share (`passthrough.rs`, `no_engine.rs`): their
//! arguments, and the proxy's shape of one event loop per core, all on one listener.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Reads `<listen addr> <upstream addr>`, then serves on a single-threaded runtime per
/// core: `per_thread` makes each thread's connection handler, which each accepted
/// connection is given to as a task of its own.
pub fn run<M, H, Fut>(name: &str, per_thread: M)
where
    M: Fn(SocketAddr) -> H + Copy + Send + 'static,
    H: Fn(TcpStream) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: {name} <listen addr> <upstream addr>");
        std::process::exit(2);
    };
    let upstream: SocketAddr = upstream.parse().expect("an upstream address");
    let listener = std::net::TcpListener::bind(listen).expect("the listen address");
    listener.set_nonblocking(true).unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let listener = listener.try_clone().unwrap();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    let handle = per_thread(upstream);
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        tokio::task::spawn_local(handle(stream));
                    }
                });
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}
