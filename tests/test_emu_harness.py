"""The CUDA emulator's own guarantees (csrc/emu), each shown on a small kernel of
tests/emu_kernels/planted.cu: a correct use of a feature gives NumPy's answer, and each planted bug
(missing barrier, write-after-read, out-of-bounds global and shared accesses, uninitialized shared
memory, missing or too-weak cp.async wait, wrong ldmatrix addressing, a lane that exits before a
collective, launches beyond the hardware's limits) is caught: a checker fails the launch with a
report naming the problem, or the result is NaN / wrong so the kernel's own test fails.
"""
import ctypes
import math

import numpy as np
import pytest

from tx_kernels import emu
from cuda_backends import skip_or_fail


def emulator_or_skip():
    try:
        emu.cuda_include_dir()
    except emu.EmulatorUnavailable as e:
        skip_or_fail(str(e))


SRC = __file__.rsplit("/", 1)[0] + "/emu_kernels/planted.cu"

# cudaError_t values the hardware returns for these failures.
INVALID_VALUE, INVALID_CONFIGURATION, LAUNCH_FAILURE, ILLEGAL_ADDRESS = 1, 9, 719, 700


@pytest.fixture(scope="module")
def lib():
    emulator_or_skip()
    path = emu.build(kernel_sources=[SRC], name="planted")
    library = ctypes.CDLL(path)
    library.planted_report.restype = ctypes.c_char_p
    return library


def call(lib, fn, arrays, *args):
    """Runs planted_<fn> over NumPy buffers; returns (error code, report)."""
    ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    sizes = (ctypes.c_size_t * len(arrays))(*[a.nbytes for a in arrays])
    err = getattr(lib, "planted_" + fn)(ptrs, sizes, *args)
    return err, lib.planted_report().decode()


def test_barrier_orders_shared_memory(lib):
    x = np.arange(128, dtype=np.float32)
    out = np.full(128, np.nan, dtype=np.float32)
    err, report = call(lib, "exchange", [x, out], 128, 1)
    assert err == 0, report
    np.testing.assert_array_equal(out, np.roll(x, -32))


def test_missing_syncthreads_is_a_race(lib):
    x = np.arange(128, dtype=np.float32)
    out = np.zeros(128, dtype=np.float32)
    err, report = call(lib, "exchange", [x, out], 128, 0)
    assert err == LAUNCH_FAILURE
    assert "shared-memory race" in report
    # Both threads and the source line of each access are named.
    assert "thread (0,0,0) of block (0,0,0)" in report or "thread (" in report
    assert "planted.cu:" in report, report


def test_write_after_read_race(lib):
    out = np.zeros(128, dtype=np.float32)
    err, report = call(lib, "war", [out])
    assert err == LAUNCH_FAILURE
    assert "write-after-read" in report, report


def test_out_of_bounds_global_read(lib):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, dtype=np.float32)
    err, report = call(lib, "global_read", [x, out], 64, 0)
    assert err == 0, report
    np.testing.assert_array_equal(out, x)
    err, report = call(lib, "global_read", [x, out], 64, 1)  # thread 63 reads x[64]
    assert err == ILLEGAL_ADDRESS
    assert "out-of-bounds global access" in report and "read of 4 bytes" in report and "past the end of `buffer0`" in report, report


def test_out_of_bounds_dynamic_shared(lib):
    out = np.zeros(64, dtype=np.float32)
    err, report = call(lib, "dynamic_shared", [out], 64, 0)
    assert err == 0, report
    err, report = call(lib, "dynamic_shared", [out], 64, 1)  # one float past the launched size
    assert err == ILLEGAL_ADDRESS
    assert "past the launched dynamic shared memory of 256 bytes" in report, report


def test_uninitialized_shared_read(lib):
    out = np.zeros(64, dtype=np.float32)
    err, report = call(lib, "uninitialized", [out])
    assert err == LAUNCH_FAILURE
    assert "uninitialized shared memory" in report, report
    assert math.isnan(out[63 - 5])  # the NaN fill is what the unwritten word holds


@pytest.mark.parametrize("wait,expect_nan", [(2, False), (1, True), (0, True)], ids=["wait0", "too-weak", "none"])
def test_cp_async_lands_only_at_its_wait(lib, wait, expect_nan):
    threads = 32
    x = np.arange(8 * threads, dtype=np.float32) + 1
    out = np.zeros(8 * threads, dtype=np.float32)
    err, report = call(lib, "cp_async", [x, out], threads, wait, 0)
    assert err == 0, report
    got = out.reshape(threads, 8)
    want = np.concatenate([x.reshape(2, threads, 4)[0], x.reshape(2, threads, 4)[1]], axis=1)
    if not expect_nan:
        np.testing.assert_array_equal(got, want)
    else:
        # The second group (too weak a wait) or both (no wait) are still in flight: NaN.
        assert np.isnan(got[:, 4:]).all()
        if wait == 0:
            assert np.isnan(got[:, :4]).all()
        else:
            np.testing.assert_array_equal(got[:, :4], want[:, :4])


def test_cp_async_zero_fill(lib):
    threads = 32
    x = np.arange(8 * threads, dtype=np.float32) + 1
    out = np.full(8 * threads, np.nan, dtype=np.float32)
    err, report = call(lib, "cp_async", [x, out], threads, 2, 1)
    assert err == 0, report
    assert (out == 0).all()


def test_ldmatrix_and_mma_match_numpy(lib):
    rng = np.random.default_rng()
    a = rng.standard_normal((16, 16)).astype(np.float16)
    b = rng.standard_normal((16, 8)).astype(np.float16)
    d = np.full((16, 8), np.nan, dtype=np.float32)
    d_trans = np.full((16, 8), np.nan, dtype=np.float32)
    bt = np.ascontiguousarray(b.T)
    err, report = call(lib, "mma", [a, bt, np.ascontiguousarray(b), d, d_trans], 0)
    assert err == 0, report
    want = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_trans, want, rtol=1e-5, atol=1e-5)


def test_wrong_ldmatrix_addressing_gives_a_wrong_product(lib):
    rng = np.random.default_rng()
    a = rng.standard_normal((16, 16)).astype(np.float16)
    b = rng.standard_normal((16, 8)).astype(np.float16)
    d = np.zeros((16, 8), dtype=np.float32)
    d_trans = np.zeros((16, 8), dtype=np.float32)
    err, report = call(lib, "mma", [a, np.ascontiguousarray(b.T), np.ascontiguousarray(b), d, d_trans], 1)
    assert err == 0, report
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(d[:2] - want[:2]).max() > 1e-3  # the product is wrong where the addresses were
    np.testing.assert_allclose(d[2:], want[2:], rtol=1e-5, atol=1e-5)
    # Exactly what swapping the row addresses of lanes 0 and 1 (matrix 0: k 0..7) loads.
    swapped = a.astype(np.float64)
    swapped[[0, 1], :8] = swapped[[1, 0], :8]
    np.testing.assert_allclose(d, swapped @ b.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_shuffles_follow_the_cuda_definitions(lib):
    out = np.zeros(128, dtype=np.int32)
    err, report = call(lib, "shuffle", [out])
    assert err == 0, report
    lane = np.arange(32)
    v = 100 + lane
    np.testing.assert_array_equal(out[:32], v[lane ^ 5])
    np.testing.assert_array_equal(out[32:64], v[(lane & ~7) + 7])
    np.testing.assert_array_equal(out[64:96], np.where(lane + 3 < 32, v[np.minimum(lane + 3, 31)], v))
    np.testing.assert_array_equal(out[96:], np.where(lane >= 2, v[np.maximum(lane - 2, 0)], v))


def test_collective_waiting_for_an_exited_lane(lib):
    out = np.zeros(32, dtype=np.float32)
    err, report = call(lib, "exited_lane", [out])
    assert err == LAUNCH_FAILURE
    assert "which has exited" in report, report


def test_block_order_changes_between_launches(lib):
    orders = set()
    for _ in range(10):
        order = np.zeros(13, dtype=np.int32)
        err, report = call(lib, "block_order", [order], 12)
        assert err == 0, report
        assert sorted(order[:12]) == list(range(12)) and order[12] == 12  # every block ran once
        orders.add(tuple(order[:12]))
    assert len(orders) > 1


def test_launch_limits(lib):
    out = np.zeros(2048, dtype=np.float32)
    launch = lambda *args: call(lib, "launch", [out], *args)[0]  # noqa: E731
    assert launch(b"H100", 1024, 1, 2, 1, 0, 0) == 0
    assert launch(b"H100", 1025, 1, 1, 1, 0, 0) == INVALID_CONFIGURATION
    assert launch(b"H100", 32, 33, 1, 1, 0, 0) == INVALID_CONFIGURATION  # 1056 threads
    assert launch(b"H100", 32, 1, 1, 65536, 0, 0) == INVALID_CONFIGURATION  # grid y
    # Dynamic shared memory: 48 KiB without the opt-in, then up to the device's limit.
    assert launch(b"H100", 32, 1, 1, 1, 48 * 1024, 0) == 0
    assert launch(b"H100", 32, 1, 1, 1, 64 * 1024, 0) == INVALID_VALUE
    assert launch(b"H100", 32, 1, 1, 1, 200 * 1024, 200 * 1024) == 0
    assert launch(b"H100", 32, 1, 1, 1, 228 * 1024, 228 * 1024) == INVALID_VALUE  # > 227 KiB
    assert launch(b"A100", 32, 1, 1, 1, 200 * 1024, 200 * 1024) == INVALID_VALUE  # > 163 KiB
    assert launch(b"A100", 32, 1, 1, 1, 160 * 1024, 160 * 1024) == 0
