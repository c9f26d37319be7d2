//! The steady-state decision path (client IP → GeoIP → route plan → the attempt planner the
//! proxy calls, with its balancer pick) must not allocate: a counting global allocator
//! watches this thread while it decides.

#[path = "../benches/support/fixture.rs"]
mod fixture;

#[path = "support/alloc.rs"]
mod alloc;

use alloc::allocations;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

#[test]
fn steady_state_decision_does_not_allocate() {
    let f = fixture::Fixture::new();
    let uk =
        f.rt.regions
            .iter()
            .position(|r| &*r.name == "uk-south")
            .unwrap_or_else(|| panic!("uk-south in the bench config"));
    // Warm-up: thread-locals (RNG), lazily built tables.
    for _ in 0..100 {
        assert_eq!(f.decide("/v1/chat/completions").map(|d| d.0), Some(uk));
    }
    let before = allocations();
    let mut picked = [0u32; 8];
    for _ in 0..10_000 {
        let (region, endpoint) = f.decide("/v1/chat/completions").unwrap_or_else(|| panic!("a decision"));
        assert_eq!(region, uk);
        picked[endpoint] += 1;
    }
    let allocated = allocations() - before;
    assert_eq!(
        allocated, 0,
        "the decision path allocated {allocated} times in 10,000 decisions"
    );
    // Power of two choices over three idle endpoints spreads the load.
    assert!(picked[..3].iter().all(|&n| n > 1000), "{picked:?}");
}

#[test]
fn model_filter_and_prefix_hash_do_not_allocate() {
    let f = fixture::Fixture::new();
    let bodies: Vec<Vec<u8>> = [100, 2048, 8192].into_iter().map(fixture::chat_body).collect();
    for body in &bodies {
        assert!(f.decide_model("/v1/chat/completions", body).is_some());
    }
    let before = allocations();
    let mut homes = [usize::MAX; 3];
    let mut moved = 0;
    for _ in 0..1_000 {
        for (i, body) in bodies.iter().enumerate() {
            let (_, endpoint) = f
                .decide_model("/v1/chat/completions", body)
                .unwrap_or_else(|| panic!("a decision"));
            if homes[i] == usize::MAX {
                homes[i] = endpoint;
            }
            moved += usize::from(homes[i] != endpoint);
        }
    }
    let allocated = allocations() - before;
    assert_eq!(
        allocated, 0,
        "model routing and prefix hashing allocated {allocated} times"
    );
    // The same prompt always lands on one endpoint (its prefix's).
    assert_eq!(moved, 0, "{homes:?}");
}
