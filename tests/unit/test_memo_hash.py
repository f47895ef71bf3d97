"""``MemoRendezvousHash`` routes exactly as pymemcache's ``RendezvousHash``."""

from pymemcache.client.rendezvous import RendezvousHash

from django_ocmemcache.client.sharded import MemoRendezvousHash

NODES = ["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"]
KEYS = [f":1:key{i}" for i in range(300)] + ["é", b":1:bytes"]


def _pair(nodes):
    plain, memo = RendezvousHash(), MemoRendezvousHash()
    for node in nodes:
        plain.add_node(node)
        memo.add_node(node)
    return plain, memo


def test_same_node_as_rendezvous_hash_twice_over():
    plain, memo = _pair(NODES)
    for _ in range(2):  # second round answers from the memo
        assert [memo.get_node(k) for k in KEYS] == [plain.get_node(k) for k in KEYS]


def test_node_changes_forget_remembered_answers():
    plain, memo = _pair(NODES)
    before = {k: memo.get_node(k) for k in KEYS}
    plain.remove_node(NODES[0])
    memo.remove_node(NODES[0])
    assert all(memo.get_node(k) != NODES[0] for k in KEYS)
    assert [memo.get_node(k) for k in KEYS] == [plain.get_node(k) for k in KEYS]
    memo.add_node(NODES[0])
    assert {k: memo.get_node(k) for k in KEYS} == before


def test_memo_is_bounded():
    _, memo = _pair(NODES)
    for i in range(MemoRendezvousHash.MEMO_SIZE * 2 + 10):
        memo.get_node(f"k{i}")
    assert len(memo._memo) <= MemoRendezvousHash.MEMO_SIZE
