"""FiRe-OPD: filter rollouts, reweight tokens, then a PPO-clipped reverse-KL policy gradient.

All per-token tensors are `[batch, response_len]` (one row per rollout). The algorithm:

1. s_i = mean_t log pi_T(y_t) over the response; keep rollout i iff s_i >= quantile(s, p/100).
2. c_t = clamp(1 - H^T_t / max H^T, 0, 1), u_t = clamp(H^S_t / max H^S, 0, 1),
   w_t = (1 + alpha c_t)(1 + beta u_t) / mean_valid(w); maxima and mean over every valid
   response token of the batch, including those of rollouts the filter drops.
3. A_t = log pi_T(y_t) - log pi_old(y_t);  A^_t = w_t A_t keep_i  (detached).
4. loss = agg( max(-A^ r, -A^ clip(r, 1 - eps, 1 + eps)) ),  r = exp(log pi_theta - log pi_old),
   over the tokens of kept rollouts.

`compute_fire_advantages` does 1-3 once per rollout batch (across data-parallel ranks when
torch.distributed is initialized); `clipped_surrogate` does 4 and can run per micro-batch
with a batch-global normalizer, so gradient accumulation reproduces the whole-batch loss.
`fire_policy_loss` chains both for callers that hold the whole batch.

Objectives. The above is `objective="sampled"` (the paper's and verl's signal: the sampled
token stands for the per-token reverse KL). `objective="full_vocab"` trains on the exact
per-token divergence D_t(pi_theta || pi_T) instead, with the same filter and weights:

    loss = sum_t k_t * w_t * keep_i * D_t        (k_t: the loss_agg_mode coefficient)

`dense_coefficients` gives k_t w_t keep_i; `fire_dense_loss` is the whole loss for one batch.
E_{y ~ pi_theta}[sampled gradient] = gradient of the full-vocab reverse KL when the ratio is 1.
"""
