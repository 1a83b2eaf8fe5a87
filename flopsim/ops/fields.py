"""The cost fields and kinds of an op (flopsim.ops.op.Op), apart so that code reading evaluated
costs (flopsim.count.OpCost, flopsim.opcache) need not import sympy."""

BYTE_FIELDS = ("weight_bytes", "act_read_bytes", "act_write_bytes", "kv_read_bytes", "kv_write_bytes")
COST_FIELDS = ("flops", "causal_flops", "other_flops", *BYTE_FIELDS, "params", "comm_bytes")

# Activation recomputation in training (flopsim.ops.op: which forward ops each mode runs again)
RECOMPUTE_MODES = ("none", "selective", "cheap", "full")
CHEAP_KINDS = ("norm", "elementwise", "softmax")  # what `cheap` recomputes (Op.cheap), residual adds excepted

KINDS = (
    "matmul",  # a dense matrix product (Linear)
    "attention",  # scores + weighted sum (fused or explicit)
    "router",  # a matrix product that routes tokens (MoD, MoE, controllers)
    "embedding",  # table lookup
    "norm",  # layernorm / rmsnorm
    "elementwise",  # activations, residual adds, scaling
    "softmax",
    "topk",  # top-k / sort / argmax selection
    "gather",  # index_select / gather of tokens
    "scatter",  # scatter / index_add back into the residual stream
    "conv",  # convolution (sparse QKV)
    "kv_cache",  # appending keys and values to the cache
    "loss",  # cross-entropy
    "optimizer",  # parameter update
    "collective",  # communication between devices (flopsim.parallel): `variant` names it, `comm_bytes` its message
)
