//! The wire frame decoder: arbitrary bytes as one WebSocket message of a session.
//!
//! Runs `hale_server::api::decode_frame`, which the session itself calls for every
//! message. A frame that decodes must encode and decode to itself; an error frame must
//! serialize (the session sends it with `expect`) and carry the frame's id only if the
//! bytes hold one.

#![no_main]

use hale_proto::{ClientFrame, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match hale_server::api::decode_frame(data) {
        Ok(frame) => {
            let encoded = serde_json::to_vec(&frame).expect("client frames serialize");
            let again = serde_json::from_slice::<ClientFrame>(&encoded).expect("a re-encoded frame decodes");
            assert_eq!(again, frame, "a frame changed in a round trip through JSON");
        }
        Err(error) => {
            assert!(matches!(*error, ServerFrame::Error { .. }), "not an error frame: {error:?}");
            serde_json::to_string(&error).expect("server frames serialize");
        }
    }
});
