//! What the agent reads from the machine code of each Redis build of the version matrix: the
//! layout, and whether unblocks bypass the exported `unblockClient` (the LTO copy of 7.4).
//! Reads the binaries only; no root needed, but every build must be there (`cargo xtask
//! setup` installs them; the upstream ones come with ../shared/redis-builds).

use std::path::{Path, PathBuf};

use agent_common::redis::served_by;
use fanout::redis::{
    binary::{Family, RedisBinary},
    unblock_paths::UnblockCoverage,
};
use integration_tests::RedisBuild;

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

#[test]
fn debians_redis_7_0_tells_served_pops_by_where_unblock_client_returns() {
    let path = std::fs::canonicalize("/usr/bin/redis-server")
        .expect("redis-server is installed by cargo xtask setup");
    let binary = RedisBinary::inspect(&path).unwrap();
    // One call of unblockClient in the split body of each serve function (list, sorted set,
    // stream): objdump shows them at 0xfffe0, 0x100224 and 0x1004b2, 5-byte calls.
    assert_eq!(binary.serving_returns, vec![0xfffe5, 0x100229, 0x1004b7]);
    assert_eq!(binary.served_by(), Some(served_by::RETURN_ADDRESS));
    assert!(!binary.uses_serving_window());
}

#[test]
fn redis_7_2_and_7_4_have_no_serve_functions_and_need_no_window() {
    for version in ["7.2.6", "7.4.1"] {
        let binary = RedisBinary::inspect(&shared_build(version)).unwrap();
        assert!(binary.serving_returns.is_empty(), "{version}");
        assert_eq!(
            binary.served_by(),
            Some(served_by::REPROCESS_ARGUMENT),
            "{version}"
        );
        assert!(!binary.uses_serving_window(), "{version}");
    }
}

#[test]
fn blocks_are_probed_at_the_calls_to_block_client_outside_block_for_keys() {
    // objdump -d of each build, `call`/`jmp` to blockClient, less blockForKeys's own (its
    // tail jump): blmoveGenericCommand's inlined blocks, WAIT, WAITAOF, CLIENT PAUSE's
    // postponing, modules. In these builds .text's file offsets are its addresses.
    let expected: [(RedisBuild, Option<Vec<u64>>); 7] = [
        (RedisBuild::V6_2, None),
        (RedisBuild::V7_0, None),
        (
            RedisBuild::V7_2,
            Some(vec![0xca7c5, 0xd7681, 0xd7867, 0xeed22, 0x17f82f]),
        ),
        (
            RedisBuild::V7_4,
            Some(vec![
                0xd7aff, 0xd7d86, 0xd7ef0, 0xd9e86, 0xe6b51, 0xe6d37, 0xffffb, 0x19efef,
            ]),
        ),
        (RedisBuild::V8_2, Some(vec![0; 7])),
        (RedisBuild::Valkey8_1, Some(vec![0; 2])),
        (RedisBuild::Valkey9_1, Some(vec![0; 4])),
    ];
    for (build, want) in expected {
        let binary = RedisBinary::inspect(&build.binary()).unwrap();
        let calls = binary.block_client_calls.clone();
        // Any load bias: 6.2 and 7.0 need one to tell served pops.
        let settings = binary.process_settings(Some(0)).unwrap();
        match (&want, &calls) {
            // The PyPI builds: how many (their addresses are not pinned here).
            (Some(w), Some(c)) if w.first() == Some(&0) => {
                assert_eq!(c.len(), w.len(), "{build:?}: {c:x?}")
            }
            _ => assert_eq!(calls, want, "{build:?}"),
        }
        assert_eq!(
            settings.block_client_at_calls,
            u32::from(calls.is_some()),
            "{build:?}: blockForKeys must not leave a mark for a probe that is not on its call"
        );
    }
}

#[test]
fn redis_7_2_and_7_4_with_lto_inline_block_for_keys_and_the_bstate_offset_is_found() {
    // blmoveGenericCommand carries its own copy of blockForKeys in both builds, so BLMOVE and
    // BRPOPLPUSH are seen at blockClient, reading c->bstate (btype at 0x1d0 in both).
    for version in ["7.2.6", "7.4.1"] {
        let binary = RedisBinary::inspect(&shared_build(version)).unwrap();
        assert_eq!(
            binary.bstate,
            Some(fanout::redis::unblock_paths::BstateAt::Embedded(0x1d0)),
            "{version}"
        );
        assert_eq!(
            binary.reprocessing,
            Some((0xe, 0x4)),
            "{version}: bit 50 of flags"
        );
        assert!(binary.catches_inlined_blocks(), "{version}");
        let settings = binary.process_settings(None).unwrap();
        assert_eq!(settings.bstate_offset, 0x1d0);
        // list (1), stream (5), zset (6) in the 7.2+ numbering; not module (4).
        assert_eq!(settings.key_btypes, (1 << 1) | (1 << 5) | (1 << 6));
    }
    let debian =
        RedisBinary::inspect(&std::fs::canonicalize("/usr/bin/redis-server").unwrap()).unwrap();
    assert!(!debian.catches_inlined_blocks());
}
