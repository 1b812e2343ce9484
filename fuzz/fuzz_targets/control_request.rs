//! A control-socket request line, whatever it holds, through the server's parse
//! (`serde_json` into `control::Request`): an error or a request, never a panic. A request
//! that parses must survive the client's encoding unchanged.
#![no_main]

use blkrepl::control::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The server reads the line into a String: other bytes fail before parsing.
    let Ok(line) = std::str::from_utf8(data) else { return };
    let Ok(request) = serde_json::from_str::<Request>(line) else { return };
    let encoded = serde_json::to_string(&request).expect("a request encodes");
    assert_eq!(serde_json::from_str::<Request>(&encoded).expect("decodes again"), request);
});
