//! A resource file, whatever it holds, through `ResourceConfig::parse`: an error naming what is
//! wrong, never a panic. A file that parses must answer what the daemon asks of it.
#![no_main]

use std::path::Path;

use blkrepl::config::ResourceConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Resource files are read as UTF-8 (`fs::read_to_string`): other bytes never reach parse.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = ResourceConfig::parse(Path::new("/etc/blkrepl/fuzz.toml"), text) else {
        return;
    };
    let _ = config.warnings();
    let _ = config.resync_rate();
    for node in &config.nodes {
        assert_eq!(config.node(&node.name).ok().map(|n| n.id), Some(node.id));
        assert_eq!(config.node_by_id(node.id).map(|n| &n.name), Some(&node.name));
        assert!(config.peers_of(node).all(|peer| peer.id != node.id));
        let _ = config.is_witness(node.id);
    }
});
