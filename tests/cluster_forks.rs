//! Forks in cluster mode, where only a cluster can go wrong: forks made and removed through
//! two nodes at once must count their source exactly (the count moves in the same guarded
//! batch as the fork), so the source goes with its last fork, never before. The rest of the
//! fork behaviour runs on NATS as `tests/forks.rs` in `scripts/test`.

mod common;

use common::ds_write::{bytes, put, write};
use common::nats::NatsCluster;
use common::{cluster_node, temp_dir};

async fn status(response: reqwest::RequestBuilder) -> u16 {
    response.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn forks_made_and_removed_through_two_nodes_at_once_count_their_source_exactly() {
    let cluster = NatsCluster::start();
    let args = ["--ds_implicit_streams", "false", "--log_level", "debug"];
    let dirs = [temp_dir(), temp_dir()];
    let nodes =
        [cluster_node(dirs[0].path(), &cluster, "F", &args), cluster_node(dirs[1].path(), &cluster, "F", &args)];
    assert_eq!(put(&nodes[0], "src", "text/plain", b"shared").await.status(), 201);
    const FORKS: usize = 24;
    // All at once, through both nodes: every fork raises the same count.
    let made = futures_util::future::join_all((0..FORKS).map(|i| {
        let node = &nodes[i % 2];
        status(write(node, reqwest::Method::PUT, &format!("f{i}")).header("stream-forked-from", "/ds/src"))
    }))
    .await;
    assert!(made.iter().all(|&s| s == 201), "{made:?}");
    // Deleted while its forks live: marked, still read through them.
    assert_eq!(status(write(&nodes[1], reqwest::Method::DELETE, "src")).await, 204);
    assert_eq!(status(nodes[0].client.head(nodes[0].ds("src"))).await, 410);
    for i in 0..FORKS {
        assert_eq!(bytes(&nodes[(i + 1) % 2], &format!("f{i}")).await, b"shared", "f{i}");
    }
    // All but one removed at once, through both nodes: the source must still be there.
    let removed = futures_util::future::join_all((1..FORKS).map(|i| {
        let node = &nodes[i % 2];
        status(write(node, reqwest::Method::DELETE, &format!("f{i}")))
    }))
    .await;
    assert!(removed.iter().all(|&s| s == 204), "{removed:?}");
    assert_eq!(status(nodes[1].client.head(nodes[1].ds("src"))).await, 410, "one fork still reads it");
    assert_eq!(bytes(&nodes[1], "f0").await, b"shared");
    // The last one takes it.
    assert_eq!(status(write(&nodes[0], reqwest::Method::DELETE, "f0")).await, 204);
    for node in &nodes {
        assert_eq!(status(node.client.head(node.ds("src"))).await, 404);
    }
    let logs = nodes[0].logs() + &nodes[1].logs();
    assert!(logs.contains("moved under a write"), "the nodes' writes never collided: the test tested nothing");
}
