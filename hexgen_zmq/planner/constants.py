"""Every constant of the planner's cost model, search and output, in one place.

Change a number here and every part of the planner sees it; nothing else in the package hard-codes a
tuning value. Units are in the names: seconds (_S), bytes (_BYTES), gibibytes (_GIB), fractions (0..1).
"""

from __future__ import annotations

GIB = 1024**3

# --- compute roofline -------------------------------------------------------------------------------------
# Share of the datasheet dense fp16 tensor peak that decoder GEMMs reach (large prefill GEMMs).
COMPUTE_EFFICIENCY = 0.55
# Share of the datasheet HBM bandwidth reached when streaming weights and KV cache (decode).
MEMORY_EFFICIENCY = 0.75
# Fixed cost per decoder layer per forward call (kernel launches, norms, rotary, Python dispatch).
LAYER_OVERHEAD_S = 60e-6
# Fixed cost per stage per step (receive, decode header, schedule, send): the runtime's message loop.
STAGE_STEP_OVERHEAD_S = 0.5e-3
# Whether the LM head is split over the last stage's TP ranks (False: every rank holds and runs it whole).
LM_HEAD_SHARDED = False

# --- memory -----------------------------------------------------------------------------------------------
# Share of a GPU's memory the planner lets a stage use (the rest: allocator fragmentation, NCCL buffers).
MEMORY_UTILISATION = 0.92
# Per-rank fixed workspace: CUDA context, cuBLAS workspaces, torch.distributed buffers.
WORKSPACE_BYTES = int(1.5 * GIB)
# Activation workspace per token of a prefill micro-batch, in units of hidden_size elements (MLP
# intermediate, attention scores and residual copies alive at once).
ACTIVATION_HIDDEN_MULTIPLE = 8

# --- network ------------------------------------------------------------------------------------------------
# Link used between two regions that the cluster file does not connect (stated, never silent: the report
# lists every such pair).
DEFAULT_WAN_GBPS = 1.0
DEFAULT_WAN_LATENCY_MS = 50.0
# (gbps, latency_ms) inside a host: PCIe 4.0 x16, 31.5 GB/s per direction (252 Gbit/s) nominal; 10 us per
# message or ring step (NCCL's small-message latency over PCIe is some tens of us for a whole ring).
DEFAULT_INTRA_HOST = (252.0, 0.01)
DEFAULT_INTRA_REGION = (10.0, 0.1)  # (gbps, latency_ms): the datacenter's Ethernet
# Share of a link's nominal bandwidth a TCP stream (pipeline hops) or an NCCL ring (TP all-reduces) reaches:
# NCCL's all-reduce bus bandwidth on 8 x A100 NVLink is about 230-240 of 300 GB/s; PCIe 4.0 P2P rings reach
# 20-25 of 31.5 GB/s (nccl-tests figures as commonly reported; an assumption, not measured here).
LINK_EFFICIENCY = 0.8
# Bytes of one sampled token id travelling from the last stage back to the first.
TOKEN_ID_BYTES = 8
# Framing bytes per message (MessagePack header, ZeroMQ frames).
MESSAGE_HEADER_BYTES = 256

# --- workload defaults ----------------------------------------------------------------------------------------
# Requests a pipeline must be able to run at once (the continuous batch): the DP reserves their KV cache
# and optimises the latency at this batch. A floor only: the simulated batch is set by memory (below).
DEFAULT_MAX_BATCH = 16
# The runtime admits requests as long as every stage's KV budget holds their whole life
# (hexgen_zmq/stage/scheduler.py), with no count limit; the planner likewise runs as many as memory holds. This
# ceiling only bounds the planner's work: one micro-batch carries at most STEP_TOKEN_BUDGET tokens, so
# beyond it a one-stage pipeline could not put every request in one step anyway.
BATCH_CEILING = 1024
# Tokens one micro-batch carries at most (the runtime's StageSpec.max_batch_tokens default in
# hexgen_zmq/operations/deployment.py): decode tokens first, then prompt chunks fill what is left (chunked prefill).
STEP_TOKEN_BUDGET = 1024
# Target share of requests that meet their deadline, for the report's "highest sustainable rate".
DEFAULT_TARGET_ATTAINMENT = 0.99
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# --- simulation ------------------------------------------------------------------------------------------------
# Poisson arrivals simulated per fitness evaluation (the same trace, scaled by the rate, for every plan).
SIM_REQUESTS = 400
# Requests simulated for the report's rate and deadline figures (a longer trace, run only a few times).
REPORT_REQUESTS = 2000
# How often the broker looks at its queue of requests that no pipeline's KV budget could take yet
# (brokers/broker.py TICK_S: queued requests are dispatched on the tick, not when one finishes).
BROKER_TICK_S = 0.05
# A CPU stage's KV budget, as the runtime sets it without kv_cache_tokens (hexgen_zmq/stage/process.py
# kv_blocks): CPU_KV_BYTES of cache, at most KV_MAX_CONTEXTS of the model's longest context. Not the host's
# memory: a plan's figures for a CPU host must hold as many requests as its stages will.
CPU_KV_BYTES = 1 << 30
KV_MAX_CONTEXTS = 64
# Requests of the step-level runtime simulation behind the report's second set of figures (stepsim.py).
RUNTIME_REQUESTS = 2000
# Relative precision of the bisection for the highest sustainable rate.
RATE_SEARCH_TOLERANCE = 0.005

# --- genetic search ----------------------------------------------------------------------------------------------
POPULATION_SIZE = 32
ELITE_COUNT = 4
TOURNAMENT_SIZE = 3
CROSSOVER_RATE = 0.5
# Relative weights of the mutation kinds (merge, split, swap).
MUTATION_WEIGHTS = (1.0, 1.0, 1.5)
# Probability that merge and swap pick a partner group in the same region.
SAME_REGION_BIAS = 0.8
DEFAULT_TIME_BUDGET_S = 30.0
# Stop early when the best plan has not changed for this many generations.
STAGNATION_GENERATIONS = 60
# Stop after this many generations at most, so that a run with the default settings ends on a count, not on
# the clock, and the same seed gives the same plan (the 58-GPU cluster stagnates after about 60-150
# generations, a few seconds on one core; see tools/bench_planner.py).
MAX_GENERATIONS = 400
DEFAULT_SEED = 0
# The prototype baseline enumerates TP splits per host; a group with more combinations is cut off here.
PROTOTYPE_MAX_COMBINATIONS = 4096

# --- deployment file ------------------------------------------------------------------------------------------------
# First port handed out on every host; the broker's two sockets come first on the broker's host.
PORT_BASE = 6000
