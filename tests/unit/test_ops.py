"""Custom-op registration (torch.ops.casakv.*): schemas, mutation, fake impls."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import casakv_vllm.ops.custom  # noqa: F401


def test_ops_registered_with_mutation_annotations():
    pa = torch.ops.casakv.paged_attention.default._schema
    rc = torch.ops.casakv.reshape_and_cache.default._schema
    assert [a.name for a in pa.arguments if a.alias_info and a.alias_info.is_write] == ["out"]
    assert [a.name for a in rc.arguments if a.alias_info and a.alias_info.is_write] == ["kv_cache"]


def test_fake_impls_trace_without_running():
    with FakeTensorMode():
        q, o = torch.empty(4, 9, 64), torch.empty(4, 9, 64)
        kv = torch.empty(10, 3, 16, 128)
        i32 = dict(dtype=torch.int32)
        torch.ops.casakv.paged_attention(q, kv, torch.empty(1, 4, **i32), torch.empty(2, **i32),
                                         torch.empty(1, **i32), 0.125, o, 4, 4)
        torch.ops.casakv.reshape_and_cache(torch.empty(4, 3, 64), torch.empty(4, 3, 64), kv,
                                           torch.empty(4, dtype=torch.int64))


def test_sparse_decode_schema_takes_physical_flag_and_holes():
    schema = torch.ops.casakv.sparse_decode.default._schema
    names = [a.name for a in schema.arguments]
    assert names[-2] == "sel_physical" and str(schema.arguments[-2].type) == "bool"
    assert names[-1] == "hole" and str(schema.arguments[-1].type) == "Optional[Tensor]"
    assert [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write] == [
        "out", "ws_acc", "ws_m", "ws_l"]


def test_import_twice_is_harmless():
    import importlib

    importlib.reload(casakv_vllm.ops.custom)
    assert hasattr(torch.ops.casakv, "paged_attention")
