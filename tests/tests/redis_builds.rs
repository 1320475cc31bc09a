//! What the agent reads from the machine code of each Redis build of the version matrix: the
//! layout, and whether unblocks bypass the exported `unblockClient` (the LTO copy of 7.4).
//! Reads the binaries only; no root needed, but every build must be there (`cargo xtask
//! setup` installs them; the upstream ones come with ../shared/redis-builds).

use std::path::{Path, PathBuf};

use fanout::redis::{
    binary::{Family, RedisBinary},
    unblock_paths::UnblockCoverage,
};

fn shared_build(version: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/redis-builds")
        .join(format!("redis-{version}/redis-server"));
    assert!(
        path.is_file(),
        "{} is missing: the version matrix needs ../shared/redis-builds beside the project",
        path.display()
    );
    path
}

#[test]
fn redis_7_4_1_with_lto_sends_unblocks_to_a_copy_that_is_found_and_probed() {
    let binary = RedisBinary::inspect(&shared_build("7.4.1")).unwrap();
    assert_eq!(binary.family, Some(Family::Redis72Plus));
    // unblockClient.constprop.0 in the unstripped build (REDIS-INTERNALS.md): both exported
    // wrappers tail-jump to it.
    assert_eq!(
        binary.unblock,
        UnblockCoverage::Clone {
            address: 0x1ff190,
            file_offset: 0x1ff190
        }
    );
}

#[test]
fn redis_7_2_6_with_lto_still_calls_the_exported_unblock_client() {
    let binary = RedisBinary::inspect(&shared_build("7.2.6")).unwrap();
    assert_eq!(binary.family, Some(Family::Redis72Plus));
    assert_eq!(binary.unblock, UnblockCoverage::Exported);
}

#[test]
fn debians_redis_7_0_has_no_wrappers_to_check() {
    let path = std::fs::canonicalize("/usr/bin/redis-server")
        .expect("redis-server is installed by cargo xtask setup");
    let binary = RedisBinary::inspect(&path).unwrap();
    assert_eq!(binary.family, Some(Family::Redis70));
    assert_eq!(binary.unblock, UnblockCoverage::Exported);
}
