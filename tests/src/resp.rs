//! A small RESP2 client for the tests: one connection, commands written whole or in pieces,
//! replies parsed fully.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::Duration,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn is_nil(&self) -> bool {
        matches!(self, Reply::Bulk(None) | Reply::Array(None))
    }
}

pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn connect(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    pub fn send(&mut self, args: &[&str]) -> std::io::Result<()> {
        self.writer.write_all(&crate::resp_command(args))
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    pub fn read(&mut self) -> std::io::Result<Reply> {
        read_reply(&mut self.reader)
    }

    pub fn call(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        self.send(args)?;
        self.read()
    }

    /// CLIENT ID of this connection.
    pub fn id(&mut self) -> i64 {
        match self.call(&["CLIENT", "ID"]) {
            Ok(Reply::Integer(id)) => id,
            other => panic!("CLIENT ID: {other:?}"),
        }
    }

    pub fn shutdown(self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
    }
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn read_reply(r: &mut BufReader<TcpStream>) -> std::io::Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(1);
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| bad(format!("bad length in {line:?}")))
    };
    Ok(match kind {
        "+" => Reply::Simple(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Integer(number()?),
        "$" => {
            let n = number()?;
            if n < 0 {
                Reply::Bulk(None)
            } else {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Reply::Bulk(Some(buf))
            }
        }
        "*" => {
            let n = number()?;
            if n < 0 {
                Reply::Array(None)
            } else {
                Reply::Array(Some(
                    (0..n).map(|_| read_reply(r)).collect::<Result<_, _>>()?,
                ))
            }
        }
        _ => return Err(bad(format!("unexpected reply {line:?}"))),
    })
}
