"""Bad input raises a clear Python exception naming the argument: never a crash, hang or wrong result.

Each case runs in a child interpreter that executes the cases in order and reports each one as it
finishes; if a case kills the child (a segfault, an abort), that case fails and the child is
restarted after it, so one crash fails one test instead of the whole run. Each child has a time
limit, so a hang fails too.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

# name -> (code raising the error, expected exception type name(s), text the message must contain)
CASES = {
    # attention
    "attn_int_query": ("TF.scaled_dot_product_attention(qi, k, v)", "TypeError", "query"),
    "attn_dtype_mismatch": ("TF.scaled_dot_product_attention(q, k.double(), v)", "TypeError", "key"),
    "attn_value_dtype": ("TF.scaled_dot_product_attention(q, k, v.half())", "TypeError", "value"),
    "attn_rank": ("TF.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0])", "ValueError", "query"),
    "attn_rank_mismatch": ("TF.scaled_dot_product_attention(q, k[0], v)", "ValueError", "key"),
    "attn_head_dim": ("TF.scaled_dot_product_attention(q, k[..., :7], v)", "ValueError", "key"),
    "attn_batch": ("TF.scaled_dot_product_attention(q, k[:1], v[:1])", "ValueError", "key"),
    "attn_kv_len": ("TF.scaled_dot_product_attention(q, k, v[:, :, :3])", "ValueError", "value"),
    "attn_gqa_not_enabled": ("TF.scaled_dot_product_attention(q, k[:, :1], v[:, :1])", "ValueError", "enable_gqa"),
    "attn_gqa_indivisible": ("TF.scaled_dot_product_attention(q[:, :3], k[:, :2], v[:, :2], enable_gqa=True)",
                             "ValueError", "multiple"),
    "attn_mask_shape": ("TF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 3, dtype=torch.bool))",
                        "ValueError", "attn_mask"),
    "attn_mask_rank": ("TF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(1, 1, 1, 5, 6))",
                       "ValueError", "attn_mask"),
    "attn_mask_int": ("TF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.int32))",
                      "TypeError", "attn_mask"),
    "attn_mask_not_tensor": ("TF.scaled_dot_product_attention(q, k, v, attn_mask=[[1.0]])", "TypeError",
                             "attn_mask"),
    "attn_dropout_range": ("TF.scaled_dot_product_attention(q, k, v, dropout_p=1.5)", "ValueError", "dropout_p"),
    "attn_op_rng_missing": ("ops.attention_fwd(q, k, v, None, 1.0, False, 0.5, None)", "ValueError", "rng"),
    "attn_op_rng_bad": ("ops.attention_fwd(q, k, v, None, 1.0, False, 0.5, torch.ones(3))", "ValueError", "rng"),
    "attn_bwd_lse_shape": ("ops.attention_bwd(q, q, k, v, q, torch.zeros(2, 4, 4), None, 1.0, False, 0.0, None, False)",
                           "ValueError", "logsumexp"),
    "attn_bwd_mask_grad_bool": ("ops.attention_bwd(q, q, k, v, q, torch.zeros(2, 4, 5), torch.ones(5, 6, dtype=torch.bool), "
                                "1.0, False, 0.0, None, True)", "ValueError", "attn_mask"),
    # layer norm
    "ln_int_input": ("TF.layer_norm(x.int(), (8,))", "TypeError", "input"),
    "ln_normalized_shape": ("TF.layer_norm(x, (7,))", "ValueError", "normalized_shape"),
    "ln_weight_shape": ("TF.layer_norm(x, (8,), torch.ones(7))", "ValueError", "weight"),
    "ln_bias_int": ("TF.layer_norm(x, (8,), torch.ones(8), torch.ones(8, dtype=torch.int64))", "TypeError", "bias"),
    "add_ln_residual_shape": ("TF.add_layer_norm(x, x[:, :2], (8,))", "ValueError", "residual"),
    "add_ln_residual_dtype": ("TF.add_layer_norm(x, x.int(), (8,))", "TypeError", "residual"),
    "ln_bwd_stats": ("ops.layer_norm_bwd(x, None, x, torch.zeros(2), torch.zeros(2), None, None, 1)", "ValueError", "mean"),
    # bias + activation, feed-forward
    "act_bias_shape": ("TF.bias_gelu(x, torch.ones(7))", "ValueError", "bias"),
    "act_int_input": ("TF.bias_relu(x.long(), torch.ones(8))", "TypeError", "input"),
    "act_name": ("TF.bias_act(x, torch.ones(8), 'swish')", "ValueError", "activation"),
    "act_approximate": ("TF.bias_gelu(x, torch.ones(8), approximate='fast')", "ValueError", "approximate"),
    "act_op_name": ("ops.bias_act_fwd(x, None, 'swish', 0.0, None)", "ValueError", "activation"),
    "ffn_input_features": ("TF.feed_forward(x, torch.ones(16, 7), None, torch.ones(8, 16), None)", "ValueError", "input"),
    "ffn_weight2": ("TF.feed_forward(x, torch.ones(16, 8), None, torch.ones(8, 15), None)", "ValueError", "weight2"),
    "ffn_activation": ("TF.feed_forward(x, torch.ones(16, 8), None, torch.ones(8, 16), None, activation='tanh')",
                       "ValueError", "activation"),
    # argument types (issue 11, finding 7): flags are bools, shapes are ints, inputs have a feature dim
    "ffn_scalar_input": ("TF.feed_forward(torch.tensor(1.), torch.ones(16, 8), None, torch.ones(8, 16), None)",
                         "ValueError", "input"),
    "ln_shape_float": ("TF.layer_norm(x, 8.0)", "TypeError", "normalized_shape"),
    "ln_shape_float_seq": ("TF.layer_norm(x, (8.0,))", "TypeError", "normalized_shape"),
    "ln_eps_str": ("TF.layer_norm(x, (8,), eps='1e-5')", "TypeError", "eps"),
    "attn_is_causal_str": ("TF.scaled_dot_product_attention(q, k, v, is_causal='yes')", "TypeError", "is_causal"),
    "attn_gqa_str": ("TF.scaled_dot_product_attention(q, k, v, enable_gqa='no')", "TypeError", "enable_gqa"),
    "attn_scale_str": ("TF.scaled_dot_product_attention(q, k, v, scale='0.5')", "TypeError", "scale"),
    "add_ln_return_residual_str": ("TF.add_layer_norm(x, x, (8,), return_residual='no')", "TypeError",
                                   "return_residual"),
    "act_name_not_str": ("TF.bias_act(x, None, 0)", "ValueError", "activation"),
    # meta (or other-device) tensors among CPU ones (finding 3): routed to the fake kernel, which
    # must refuse them instead of returning uninitialised memory
    "meta_ln_weight": ("TF.layer_norm(x, (8,), torch.ones(8, device='meta'))", "ValueError", "weight"),
    "meta_ln_bias": ("TF.layer_norm(x, (8,), None, torch.ones(8, device='meta'))", "ValueError", "bias"),
    "meta_add_ln_residual": ("TF.add_layer_norm(x, x.to('meta'), (8,))", "ValueError", "residual"),
    "meta_act_bias": ("TF.bias_relu(x, torch.ones(8, device='meta'))", "ValueError", "bias"),
    "meta_attn_mask": ("TF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, device='meta'))",
                       "ValueError", "attn_mask"),
    "meta_attn_key": ("TF.scaled_dot_product_attention(q, k.to('meta'), v)", "ValueError", "key"),
    "meta_attn_bwd_lse": ("ops.attention_bwd(q, q, k, v, q, torch.zeros(2, 4, 5, device='meta'), None, 1.0, "
                          "False, 0.0, None, False)", "ValueError", "logsumexp"),
    "meta_ln_bwd_rstd": ("ops.layer_norm_bwd(x, None, x, torch.zeros(6), torch.zeros(6, device='meta'), None, "
                         "None, 1)", "ValueError", "rstd"),
    "meta_act_bwd_grad": ("ops.bias_act_bwd(x.to('meta'), x, None, 'relu', 0.0, None)", "ValueError", "grad_out"),
}

PRELUDE = """
import torch
import tx_kernels.functional as TF
from tx_kernels.ops import ops
torch.manual_seed(0)
q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
qi = q.int()
x = torch.randn(2, 3, 8)
"""

RUNNER = PRELUDE + textwrap.dedent("""
import json, sys
cases = json.loads(sys.argv[1])
for name, code in cases:
    try:
        exec(code)
        result = {"name": name, "raised": None, "message": ""}
    except Exception as e:
        result = {"name": name, "raised": type(e).__name__, "message": str(e)}
    print("RESULT " + json.dumps(result), flush=True)
""")

_results = {}


def _run_all():
    pending = list(CASES.items())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    while pending:
        batch = [(name, code) for name, (code, _, _) in pending]
        try:
            proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(batch)], capture_output=True,
                                  text=True, timeout=120, env=env)
            stdout, code = proc.stdout, proc.returncode
            tail = proc.stderr[-2000:]
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            code, tail = "timeout", ""
        done = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
        for r in done:
            _results[r["name"]] = r
        pending = pending[len(done):]
        if pending:  # the child died (or hung) on the first pending case
            name = pending[0][0]
            _results[name] = {"name": name, "raised": f"child died ({code})", "message": tail}
            pending = pending[1:]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_clear_error(name):
    if not _results:
        _run_all()
    code, expected_type, must_mention = CASES[name]
    r = _results[name]
    assert r["raised"] is not None, f"{code!r} did not raise"
    assert r["raised"] == expected_type, f"{code!r} raised {r['raised']}: {r['message']}"
    assert must_mention in r["message"], f"{code!r}: message does not name `{must_mention}`: {r['message']}"
