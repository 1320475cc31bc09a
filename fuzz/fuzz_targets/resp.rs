//! Fuzzes the RESP tokenizer shared by the eBPF programs and the agent: arbitrary bytes, cut
//! at arbitrary points, must never panic; the events must not depend on where the stream was
//! cut; and the key-list extractor must agree with the stream tokenizer.
#![no_main]

use agent_common::resp::{drive, listened_keys, Carry, ReplyState, RequestState, Stepper};
use libfuzzer_sys::fuzz_target;

fn run<S: Stepper + Default>(chunks: &[&[u8]]) -> (Result<(), ()>, Vec<S::Event>) {
    let (mut state, mut carry, mut events) = (S::default(), Carry::default(), Vec::new());
    for chunk in chunks {
        if let Err(()) = drive(&mut state, &mut carry, chunk, |e, _| events.push(e)) {
            return (Err(()), events);
        }
    }
    (Ok(()), events)
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    // The first two bytes choose the cuts; the rest is the stream.
    let data = &input[2..];
    let a = (input[0] as usize * data.len()) / 256;
    let b = a + ((input[1] as usize) * (data.len() - a)) / 256;
    let chunks = [&data[..a], &data[a..b], &data[b..]];

    let (whole, whole_events) = run::<RequestState>(&[data]);
    let (cut, cut_events) = run::<RequestState>(&chunks);
    if whole.is_ok() {
        assert!(cut.is_ok(), "a valid request stream became invalid when cut");
        assert_eq!(whole_events, cut_events);
    }
    let (whole, whole_events) = run::<ReplyState>(&[data]);
    let (cut, cut_events) = run::<ReplyState>(&chunks);
    if whole.is_ok() {
        assert!(cut.is_ok(), "a valid reply stream became invalid when cut");
        assert_eq!(whole_events, cut_events);
    }
    let mut keys = 0u32;
    if let Some(call) = listened_keys(data, |_| keys += 1) {
        assert_eq!(call.keys, keys, "extractor and tokenizer disagree on the key count");
        let (_, events) = run::<RequestState>(&[data]);
        assert_eq!(events.first(), Some(&call));
    }
});
