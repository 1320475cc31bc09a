//! The OTLP collector the soak points the agent at, in three moods on one address: up (it
//! answers every OTLP/HTTP request with 200), down (nothing listens), and a black hole (it
//! accepts connections and never answers). Up, it checks that each request is a complete
//! protobuf body of the size the agent announced; it does not decode it (the suite's OTLP
//! tests do).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Mood {
    Up,
    Down,
    BlackHole,
}

impl Mood {
    fn code(self) -> u8 {
        self as u8
    }
    fn from_code(code: u8) -> Self {
        match code {
            0 => Mood::Up,
            1 => Mood::Down,
            _ => Mood::BlackHole,
        }
    }
    pub fn next(self) -> Self {
        match self {
            Mood::Up => Mood::Down,
            Mood::Down => Mood::BlackHole,
            Mood::BlackHole => Mood::Up,
        }
    }
}

pub struct Collector {
    pub port: u16,
    mood: Arc<AtomicU8>,
    /// Requests answered with 200 while up.
    pub accepted: Arc<AtomicU64>,
    /// Connections or requests held unanswered while a black hole.
    pub swallowed: Arc<AtomicU64>,
}

impl Collector {
    /// Listens on a free port, up.
    pub fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let collector = Collector {
            port,
            mood: Arc::new(AtomicU8::new(Mood::Up.code())),
            accepted: Default::default(),
            swallowed: Default::default(),
        };
        let (mood, accepted, swallowed) = (
            collector.mood.clone(),
            collector.accepted.clone(),
            collector.swallowed.clone(),
        );
        thread::spawn(move || {
            // Down is a closed listener; it is bound again when the mood changes back.
            let mut listener = Some(listener);
            loop {
                let current = Mood::from_code(mood.load(Ordering::Relaxed));
                match (current, &listener) {
                    (Mood::Down, Some(_)) => listener = None,
                    (Mood::Down, None) => {
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    (_, None) => match TcpListener::bind(("127.0.0.1", port)) {
                        Ok(l) => listener = Some(l),
                        Err(_) => {
                            thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    },
                    _ => {}
                }
                let Some(l) = &listener else { continue };
                l.set_nonblocking(true).ok();
                match l.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).ok();
                        if current == Mood::Up {
                            let (accepted, swallowed, mood) =
                                (accepted.clone(), swallowed.clone(), mood.clone());
                            thread::spawn(move || serve(stream, &accepted, &swallowed, &mood));
                        } else {
                            swallowed.fetch_add(1, Ordering::Relaxed);
                            // Held open, never answered, until the mood changes.
                            let mood = mood.clone();
                            thread::spawn(move || {
                                while mood.load(Ordering::Relaxed) == Mood::BlackHole.code() {
                                    thread::sleep(Duration::from_millis(100));
                                }
                                drop(stream);
                            });
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(collector)
    }

    pub fn set(&self, mood: Mood) {
        self.mood.store(mood.code(), Ordering::Relaxed);
    }

    pub fn mood(&self) -> Mood {
        Mood::from_code(self.mood.load(Ordering::Relaxed))
    }
}

/// Answers OTLP/HTTP requests on one connection (keep-alive) with 200 and an empty
/// `ExportMetricsServiceResponse`, in the collector's current mood: a request that arrives
/// while it is down closes the connection, while it is a black hole gets no answer.
fn serve(stream: TcpStream, accepted: &AtomicU64, swallowed: &AtomicU64, mood: &AtomicU8) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = None;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if first {
                if !line.starts_with("POST ") {
                    return;
                }
                first = false;
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let Some(length) = length else { return };
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        match Mood::from_code(mood.load(Ordering::Relaxed)) {
            Mood::Up => {}
            Mood::Down => return,
            Mood::BlackHole => {
                swallowed.fetch_add(1, Ordering::Relaxed);
                while mood.load(Ordering::Relaxed) == Mood::BlackHole.code() {
                    thread::sleep(Duration::from_millis(100));
                }
                return;
            }
        }
        accepted.fetch_add(1, Ordering::Relaxed);
        let response =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}
