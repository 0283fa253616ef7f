//! Causal flash attention, and the gated FFN's activation ([`swiglu`]), over host memory, for CPU
//! backends.
//!
//! burn-flex 0.21's fused kernel scales, masks and exponentiates every score one at a time with
//! libm's `expf` (half of an 8k prefill in `perf`) and masks every tile. This kernel does the same
//! online softmax (f32 throughout) with the work vectorised: scores of 4 query rows by a tile of
//! 64 keys in registers, a polynomial `exp2` over the whole tile, the causal mask only on the
//! tiles the diagonal crosses and no tile past a block's last query. Each (batch, head, block of
//! 64 queries) is one work item; items are dealt over threads, largest first. It is compiled for
//! AVX-512 and AVX2+FMA and for any CPU; the caller names the [`Isa`] (normally [`Isa::best`]).

use crate::Isa;

/// Query rows per work item: its queries, scores and output stay in L1/L2 while it sweeps the keys.
const ROWS: usize = 64;
/// Keys per tile, the width of one score row kept in registers.
const TILE: usize = 64;
/// Query rows scored together against one tile (4 x 64 accumulators fill 16 AVX-512 registers).
const GROUP: usize = 4;

/// Shape of one [`causal_attention`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostShape {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads (`heads` a multiple of it); query head `h` reads KV head `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    /// Query rows per head.
    pub queries: usize,
    /// Key rows stored per KV head.
    pub keys: usize,
    /// Keys attended: the first `visible` of the stored ones (`queries <= visible <= keys`).
    pub visible: usize,
    /// Feature size of queries, keys and values (one of [`HEAD_DIMS`]).
    pub head_dim: usize,
}

/// Head sizes the kernel is compiled for; any other goes to the backend's own kernel.
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// What [`causal_attention`] computed.
#[derive(Debug, Clone, PartialEq)]
pub struct HostOutput {
    /// Attention output, `[batch, heads, queries, head_dim]`.
    pub output: Vec<f32>,
    /// When asked: each query head's attention probabilities summed over its queries,
    /// `[batch, heads, visible]` (what H2O accumulates).
    pub column_sums: Option<Vec<f32>>,
}

/// Causal attention with the chunk's queries last among the keys (bottom-right aligned): query `i`
/// sees keys `0 ..= visible - queries + i`.
///
/// `q` is `[batch, heads, queries, head_dim]`, `k` and `v` `[batch, kv_heads, keys, head_dim]`,
/// all row-major, on up to `threads` threads. For column sums, when asked, each block keeps its
/// exponentials (64 rows by the keys it sees) and rescales them once its rows' final maxima and
/// sums are known: exact, and a pass over memory instead of a second pass over the scores.
/// `None` for a head size outside [`HEAD_DIMS`] or inconsistent lengths. `isa` picks the build
/// (the widest this CPU runs at or below it).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: HostShape,
    scale: f32,
    column_sums: bool,
    threads: usize,
    isa: Isa,
) -> Option<HostOutput> {
    let HostShape {
        batch,
        heads,
        kv_heads,
        queries,
        keys,
        visible,
        head_dim: d,
    } = shape;
    let consistent = batch > 0
        && kv_heads > 0
        && heads > 0
        && heads % kv_heads == 0
        && queries > 0
        && queries <= visible
        && visible <= keys
        && q.len() == batch * heads * queries * d
        && k.len() == batch * kv_heads * keys * d
        && v.len() == k.len();
    if !consistent || !HEAD_DIMS.contains(&d) {
        return None;
    }
    // Keys transposed tile by tile, `[kv head][tile][feature] -> 64 keys`, zero-padded to whole
    // tiles: a tile's scores are then a sum over features of one query feature times 64 keys.
    let tiles = visible.div_ceil(TILE);
    let mut kt = vec![[splat(0.0); TILE_V]; batch * kv_heads * tiles * d];
    for (head, dst) in kt.chunks_mut(tiles * d).enumerate() {
        let src = &k[head * keys * d..][..visible * d];
        for (j, row) in src.chunks_exact(d).enumerate() {
            let tile = &mut dst[(j / TILE) * d..][..d];
            let c = j % TILE;
            for (f, &x) in row.iter().enumerate() {
                tile[f][c / LANES][c % LANES] = x;
            }
        }
    }
    let mut out = vec![0f32; batch * heads * queries * d];
    let group = heads / kv_heads;
    let mut items: Vec<(Item, &mut [f32])> = out
        .chunks_mut(queries * d)
        .enumerate()
        .flat_map(|(bh, head_out)| {
            head_out
                .chunks_mut(ROWS * d)
                .enumerate()
                .map(move |(block, o)| {
                    let (b, h) = (bh / heads, bh % heads);
                    (
                        Item {
                            q_head: bh,
                            kv_head: b * kv_heads + h / group,
                            first: block * ROWS,
                        },
                        o,
                    )
                })
        })
        .collect();
    // Later blocks see more keys: deal them out first, round robin, so the threads end together.
    items.sort_by_key(|(item, _)| std::cmp::Reverse(item.first));
    let threads = threads.clamp(1, items.len());
    let mut dealt: Vec<Vec<(Item, &mut [f32])>> = (0..threads).map(|_| Vec::new()).collect();
    for (j, item) in items.into_iter().enumerate() {
        dealt[j % threads].push(item);
    }
    let ctx = Ctx {
        q,
        kt: &kt,
        v,
        queries,
        keys,
        visible,
        tiles,
        scale: scale * std::f32::consts::LOG2_E,
        column_sums: column_sums.then_some(batch * heads * visible),
    };
    let isa = isa.usable();
    let run = |work: Vec<(Item, &mut [f32])>| match d {
        16 => run_items::<1>(&ctx, work, isa),
        32 => run_items::<2>(&ctx, work, isa),
        64 => run_items::<4>(&ctx, work, isa),
        _ => run_items::<8>(&ctx, work, isa),
    };
    let sums: Vec<Option<Vec<f32>>> = if threads == 1 {
        dealt.into_iter().map(run).collect()
    } else {
        std::thread::scope(|s| {
            let workers: Vec<_> = dealt
                .into_iter()
                .map(|work| s.spawn(|| run(work)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("an attention thread"))
                .collect()
        })
    };
    // Each thread summed the blocks it ran; the blocks of one head ran on several.
    let column_sums = sums.into_iter().flatten().reduce(|mut total, part| {
        total.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
        total
    });
    Some(HostOutput {
        output: out,
        column_sums,
    })
}

/// `silu(gate) * up` element by element (Llama's gated FFN), the exponential vectorised as in the
/// attention kernel, over `threads` threads with `isa`'s build; `None` when the lengths differ.
/// burn-flex 0.21 takes the sigmoid one element at a time through libm's `expf`, then multiplies
/// in two more passes.
pub fn swiglu(gate: &[f32], up: &[f32], threads: usize, isa: Isa) -> Option<Vec<f32>> {
    let isa = isa.usable();
    if gate.len() != up.len() {
        return None;
    }
    let mut out = vec![0f32; gate.len()];
    let chunk = gate
        .len()
        .div_ceil(threads.max(1))
        .next_multiple_of(LANES)
        .max(LANES);
    let pieces: Vec<_> = out
        .chunks_mut(chunk)
        .zip(gate.chunks(chunk).zip(up.chunks(chunk)))
        .collect();
    if pieces.len() <= 1 {
        pieces
            .into_iter()
            .for_each(|(o, (g, u))| swiglu_span(g, u, o, isa));
    } else {
        std::thread::scope(|s| {
            for (o, (g, u)) in pieces {
                s.spawn(move || swiglu_span(g, u, o, isa));
            }
        });
    }
    Some(out)
}

/// One thread's share of [`swiglu`] with `isa`'s build (one [`Isa::usable`] returned).
fn swiglu_span(g: &[f32], u: &[f32], o: &mut [f32], isa: Isa) {
    match isa {
        // SAFETY: `isa` came from `Isa::usable`, so this CPU has AVX-512F, AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { swiglu_avx512(g, u, o) },
        // SAFETY: as above, AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { swiglu_avx2(g, u, o) },
        _ => swiglu_lanes::<false>(g, u, o),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn swiglu_avx512(g: &[f32], u: &[f32], o: &mut [f32]) {
    swiglu_lanes::<true>(g, u, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn swiglu_avx2(g: &[f32], u: &[f32], o: &mut [f32]) {
    swiglu_lanes::<true>(g, u, o)
}

/// Replaces each `x` of `row` by `exp(x - max)` (`max` at least every `x`) with the polynomial
/// `exp2` of the attention kernel, and returns their sum: a softmax row's exponentials, for the
/// decode kernel, with `isa`'s build (one [`Isa::usable`] returned). Below `exp(-88)` it gives 0,
/// as a dead slot's bias wants.
pub(crate) fn exp_shifted(row: &mut [f32], max: f32, isa: Isa) -> f32 {
    match isa {
        // SAFETY: `isa` came from `Isa::usable`, so this CPU has AVX-512F, AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { exp_shifted_avx512(row, max) },
        // SAFETY: as above, AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { exp_shifted_avx2(row, max) },
        _ => exp_shifted_lanes::<false>(row, max),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn exp_shifted_avx512(row: &mut [f32], max: f32) -> f32 {
    exp_shifted_lanes::<true>(row, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_shifted_avx2(row: &mut [f32], max: f32) -> f32 {
    exp_shifted_lanes::<true>(row, max)
}

#[inline(always)]
fn exp_shifted_lanes<const FMA: bool>(row: &mut [f32], max: f32) -> f32 {
    let mut chunks = row.chunks_exact_mut(LANES);
    let mut acc = splat(0.0);
    for c in &mut chunks {
        let e = exp2::<FMA>(lanes(|i| (c[i] - max) * std::f32::consts::LOG2_E));
        c.copy_from_slice(&e);
        acc = lanes(|i| acc[i] + e[i]);
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = exp2::<FMA>(splat((*x - max) * std::f32::consts::LOG2_E))[0];
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// `g u sigmoid(g)` with `e = exp(-|g|)`: `g u / (1 + e)` for `g >= 0`, `g u e / (1 + e)` below,
/// so the exponential never overflows.
#[inline(always)]
fn swiglu_lanes<const FMA: bool>(g: &[f32], u: &[f32], o: &mut [f32]) {
    let whole = g.len() / LANES * LANES;
    for ((gc, uc), oc) in g[..whole]
        .chunks_exact(LANES)
        .zip(u[..whole].chunks_exact(LANES))
        .zip(o[..whole].chunks_exact_mut(LANES))
    {
        let gv: V = lanes(|i| gc[i]);
        let e = exp2::<FMA>(lanes(|i| -gv[i].abs() * std::f32::consts::LOG2_E));
        let r: V =
            lanes(|i| gv[i] * uc[i] * (if gv[i] >= 0.0 { 1.0 } else { e[i] }) / (1.0 + e[i]));
        oc.copy_from_slice(&r);
    }
    for ((&gi, &ui), oi) in g[whole..].iter().zip(&u[whole..]).zip(&mut o[whole..]) {
        let e = (-gi.abs()).exp();
        *oi = gi * ui * (if gi >= 0.0 { 1.0 } else { e }) / (1.0 + e);
    }
}

/// One work item: a block of up to [`ROWS`] queries of one head.
#[derive(Debug, Clone, Copy)]
struct Item {
    /// Index of the (batch, query head) pair.
    q_head: usize,
    /// Index of the (batch, KV head) pair it reads.
    kv_head: usize,
    /// First query row of the block.
    first: usize,
}

/// What every work item of one call reads.
struct Ctx<'a> {
    q: &'a [f32],
    /// Keys, tile by tile (see [`causal_attention`]).
    kt: &'a [[V; TILE_V]],
    v: &'a [f32],
    queries: usize,
    keys: usize,
    visible: usize,
    /// Key tiles per KV head.
    tiles: usize,
    /// Softmax scale times `log2(e)`, so the exponentials are powers of two.
    scale: f32,
    /// Length of the column sums to accumulate (`batch x heads x visible`), when asked.
    column_sums: Option<usize>,
}

/// Runs `work` with `isa`'s build (one [`Isa::usable`] returned); `N` is the head size in [`V`]s.
/// Returns the column sums of the blocks it ran, when asked.
fn run_items<const N: usize>(
    ctx: &Ctx,
    work: Vec<(Item, &mut [f32])>,
    isa: Isa,
) -> Option<Vec<f32>> {
    match isa {
        // SAFETY: `isa` came from `Isa::usable`, so this CPU has AVX-512F, AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { run_avx512::<N>(ctx, work) },
        // SAFETY: as above, AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { run_avx2::<N>(ctx, work) },
        _ => run_portable::<N>(ctx, work),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn run_avx512<const N: usize>(ctx: &Ctx, work: Vec<(Item, &mut [f32])>) -> Option<Vec<f32>> {
    run_blocks::<N, true>(ctx, work)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_avx2<const N: usize>(ctx: &Ctx, work: Vec<(Item, &mut [f32])>) -> Option<Vec<f32>> {
    run_blocks::<N, true>(ctx, work)
}

fn run_portable<const N: usize>(ctx: &Ctx, work: Vec<(Item, &mut [f32])>) -> Option<Vec<f32>> {
    run_blocks::<N, false>(ctx, work)
}

/// The blocks of one thread, inlined into each instruction set's entry point.
#[inline(always)]
fn run_blocks<const N: usize, const FMA: bool>(
    ctx: &Ctx,
    work: Vec<(Item, &mut [f32])>,
) -> Option<Vec<f32>> {
    let mut scratch = Scratch::<N>::new();
    let mut sums = ctx.column_sums.map(|len| vec![0f32; len]);
    for (item, out) in work {
        let cols = sums
            .as_mut()
            .map(|s| &mut s[item.q_head * ctx.visible..][..ctx.visible]);
        attend_block::<N, FMA>(ctx, item, out, cols, &mut scratch);
    }
    sums
}

/// Sixteen lanes: every kernel loop is written over these, so each lane-wise helper compiles to one
/// AVX-512 instruction (two with AVX2) whatever the compiler's loop heuristics decide.
type V = [f32; LANES];
const LANES: usize = 16;
/// [`V`]s per tile row.
const TILE_V: usize = TILE / LANES;

#[inline(always)]
fn lanes(f: impl Fn(usize) -> f32) -> V {
    std::array::from_fn(f)
}

#[inline(always)]
fn splat(x: f32) -> V {
    [x; LANES]
}

/// `a * b + c` lane by lane, fused where the instruction set has it (a libm call otherwise).
#[inline(always)]
fn madd<const FMA: bool>(a: V, b: V, c: V) -> V {
    lanes(|i| {
        if FMA {
            a[i].mul_add(b[i], c[i])
        } else {
            a[i] * b[i] + c[i]
        }
    })
}

#[inline(always)]
fn larger(a: V, b: V) -> V {
    lanes(|i| if a[i] > b[i] { a[i] } else { b[i] })
}

/// Largest lane.
#[inline(always)]
fn max_lane(x: V) -> f32 {
    x.iter()
        .fold(f32::NEG_INFINITY, |m, &y| if y > m { y } else { m })
}

/// `2^x` lane by lane for `x <= 0` (exactly 0 below -127), Cephes' exp2f polynomial: relative
/// error ~2e-7, from integer and float ops only.
#[inline(always)]
fn exp2<const FMA: bool>(x: V) -> V {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    const P: [f32; 6] = [
        1.535_336_2e-4,
        1.339_887_4e-3,
        9.618_438e-3,
        5.550_332_5e-2,
        2.402_264_8e-1,
        6.931_472e-1,
    ];
    let x = larger(x, splat(-127.0));
    let r = lanes(|i| x[i] + ROUND);
    let f = lanes(|i| x[i] - (r[i] - ROUND));
    let mut poly = splat(P[0]);
    for &c in &P[1..] {
        poly = madd::<FMA>(poly, f, splat(c));
    }
    let two_n = lanes(|i| f32::from_bits(r[i].to_bits().wrapping_add(127) << 23));
    madd::<FMA>(lanes(|i| f[i] * poly[i]), two_n, two_n)
}

/// Per-thread buffers of one work item, `N` [`V`]s per head row.
struct Scratch<const N: usize> {
    /// The block's queries, scaled.
    q: Vec<[V; N]>,
    /// Scores, then probabilities, of the current tile.
    s: Vec<[V; TILE_V]>,
    /// Unnormalised output rows.
    o: Vec<[V; N]>,
    /// Running maximum (log2 units) of each row.
    max: Vec<f32>,
    /// Running sum of each row's exponentials, lane by lane.
    sum: Vec<V>,
    /// One over each row's final sum.
    inv: Vec<f32>,
    /// For column sums: each row's exponentials of every tile (`[row][tile]`, at most
    /// `ROWS x visible` floats a thread), and the running max each tile's are relative to.
    kept: Vec<[V; TILE_V]>,
    kept_max: Vec<f32>,
}

impl<const N: usize> Scratch<N> {
    fn new() -> Self {
        Self {
            q: vec![[splat(0.0); N]; ROWS],
            s: vec![[splat(0.0); TILE_V]; ROWS],
            o: vec![[splat(0.0); N]; ROWS],
            max: vec![0.0; ROWS],
            sum: vec![splat(0.0); ROWS],
            inv: vec![0.0; ROWS],
            kept: Vec::new(),
            kept_max: Vec::new(),
        }
    }
}

/// Scores of the block's (padded) rows against the tile at key `c0`, masked where the diagonal
/// crosses it: GROUP rows at a time, each row's 64 accumulators in registers.
#[inline(always)]
fn tile_scores<const N: usize, const FMA: bool>(
    ctx: &Ctx,
    item: Item,
    c0: usize,
    first_limit: usize,
    padded_rows: usize,
    sc: &mut Scratch<N>,
) {
    let d = N * LANES;
    let tile = &ctx.kt[(item.kv_head * ctx.tiles + c0 / TILE) * d..][..d];
    for (queries, scores) in sc.q[..padded_rows]
        .chunks_exact(GROUP)
        .zip(sc.s.chunks_exact_mut(GROUP))
    {
        let mut acc = [[splat(0.0); TILE_V]; GROUP];
        for (f, keys) in tile.iter().enumerate() {
            for (acc, query) in acc.iter_mut().zip(queries) {
                let a = splat(query[f / LANES][f % LANES]);
                for j in 0..TILE_V {
                    acc[j] = madd::<FMA>(a, keys[j], acc[j]);
                }
            }
        }
        scores.copy_from_slice(&acc);
    }
    // Row r sees keys up to first_limit + r; later ones (the padding among them) are masked.
    if c0 + TILE - 1 > first_limit {
        for (r, s) in sc.s[..padded_rows].iter_mut().enumerate() {
            let limit = first_limit + r;
            for (j, x) in s.iter_mut().enumerate() {
                *x = lanes(|i| {
                    if c0 + j * LANES + i > limit {
                        f32::NEG_INFINITY
                    } else {
                        x[i]
                    }
                });
            }
        }
    }
}

/// One block of queries of one head against every key it can see: online softmax over tiles,
/// then, when `cols` is given, each key's probabilities added into it.
#[inline(always)]
fn attend_block<const N: usize, const FMA: bool>(
    ctx: &Ctx,
    item: Item,
    out: &mut [f32],
    cols: Option<&mut [f32]>,
    sc: &mut Scratch<N>,
) {
    let d = N * LANES;
    let rows = out.len() / d;
    let offset = ctx.visible - ctx.queries;
    // Keys up to which (inclusive) the block's first and last rows see.
    let first_limit = offset + item.first;
    let last_limit = first_limit + rows - 1;
    // Rows per pass over a tile's values: 16 accumulators (8 with 128-wide heads).
    let value_rows = (16 / N).clamp(GROUP / 2, GROUP * 2);
    // Rows past the block's last are computed too, as zero queries, so every pass is whole; their
    // results are never written out.
    let padded_rows = rows.next_multiple_of(GROUP.max(value_rows));
    let q = &ctx.q[(item.q_head * ctx.queries + item.first) * d..][..rows * d];
    for r in 0..padded_rows {
        sc.q[r] = if r < rows {
            std::array::from_fn(|j| lanes(|i| q[r * d + j * LANES + i] * ctx.scale))
        } else {
            [splat(0.0); N]
        };
        sc.o[r] = [splat(0.0); N];
        sc.max[r] = f32::NEG_INFINITY;
        sc.sum[r] = splat(0.0);
    }
    let v = &ctx.v[item.kv_head * ctx.keys * d..][..ctx.visible * d];
    let tiles = last_limit / TILE + 1;
    if cols.is_some() && sc.kept.len() < rows * tiles {
        sc.kept.resize(rows * tiles, [splat(0.0); TILE_V]);
        sc.kept_max.resize(rows * tiles, 0.0);
    }
    for c0 in (0..=last_limit).step_by(TILE) {
        tile_scores::<N, FMA>(ctx, item, c0, first_limit, padded_rows, sc);
        // Online softmax: new running max, rescale what was accumulated, exponentiate the tile.
        for r in 0..padded_rows {
            let s = &mut sc.s[r];
            let tile_max = max_lane(
                s.iter()
                    .fold(splat(f32::NEG_INFINITY), |m, &x| larger(m, x)),
            );
            let old = sc.max[r];
            let new = if tile_max > old { tile_max } else { old };
            // Row 0 always sees key 0, so every row's max is finite after the first tile.
            let new_v = splat(new);
            let mut sum = splat(0.0);
            for x in s.iter_mut() {
                *x = exp2::<FMA>(lanes(|i| x[i] - new_v[i]));
                sum = lanes(|i| sum[i] + x[i]);
            }
            if new > old {
                let correction = splat(exp2::<FMA>(splat(old - new))[0]);
                sc.sum[r] = madd::<FMA>(sc.sum[r], correction, sum);
                for x in sc.o[r].iter_mut() {
                    *x = lanes(|i| x[i] * correction[i]);
                }
            } else {
                sc.sum[r] = lanes(|i| sc.sum[r][i] + sum[i]);
            }
            sc.max[r] = new;
        }
        if cols.is_some() {
            // Kept for the column sums: this tile's exponentials and the max they are relative to.
            let tile = c0 / TILE;
            for r in 0..rows {
                sc.kept[r * tiles + tile] = sc.s[r];
                sc.kept_max[r * tiles + tile] = sc.max[r];
            }
        }
        // Output += probabilities x the tile's values, value_rows rows per pass over the values.
        let width = TILE.min(last_limit + 1 - c0);
        let values = &v[c0 * d..(c0 + width) * d];
        for (outs, probs) in sc.o[..padded_rows]
            .chunks_exact_mut(value_rows)
            .zip(sc.s.chunks_exact(value_rows))
        {
            let mut acc = [[splat(0.0); N]; GROUP * 2];
            acc[..value_rows].copy_from_slice(outs);
            for (c, row) in values.chunks_exact(d).enumerate() {
                let row: [V; N] = std::array::from_fn(|j| {
                    row[j * LANES..][..LANES].try_into().expect("a whole row")
                });
                for (acc, p) in acc.iter_mut().zip(probs) {
                    let p = splat(p.as_flattened()[c]);
                    for j in 0..N {
                        acc[j] = madd::<FMA>(p, row[j], acc[j]);
                    }
                }
            }
            outs.copy_from_slice(&acc[..value_rows]);
        }
    }
    for r in 0..rows {
        sc.inv[r] = 1.0 / sc.sum[r].iter().sum::<f32>();
    }
    for (r, dst) in out.chunks_exact_mut(d).enumerate() {
        for (j, chunk) in dst.chunks_exact_mut(LANES).enumerate() {
            for (x, &y) in chunk.iter_mut().zip(&sc.o[r][j]) {
                *x = y * sc.inv[r];
            }
        }
    }
    let Some(cols) = cols else { return };
    // Column sums: each kept exponential rescaled from its tile's max to the row's final max and
    // divided by the row's sum, summed over the block's real rows (not its padding).
    for tile in 0..tiles {
        let mut acc = [splat(0.0); TILE_V];
        for r in 0..rows {
            let factor =
                exp2::<FMA>(splat(sc.kept_max[r * tiles + tile] - sc.max[r]))[0] * sc.inv[r];
            let factor = splat(factor);
            for (acc, p) in acc.iter_mut().zip(&sc.kept[r * tiles + tile]) {
                *acc = madd::<FMA>(*p, factor, *acc);
            }
        }
        let c0 = tile * TILE;
        let width = TILE.min(last_limit + 1 - c0);
        for (col, p) in cols[c0..c0 + width].iter_mut().zip(acc.as_flattened()) {
            *col += p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_equals_silu_times_up_in_f64() {
        // Lengths off the lane count, on 1 and 3 threads; gates from -90 to 90.
        for ((n, threads), isa) in [(1, 1), (37, 3), (1000, 1), (4099, 3)]
            .into_iter()
            .flat_map(|c| Isa::available().into_iter().map(move |i| (c, i)))
        {
            let gate: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1801) as f32 - 900.0) / 10.0)
                .collect();
            let up: Vec<f32> = (0..n)
                .map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 100.0)
                .collect();
            let got = swiglu(&gate, &up, threads, isa).unwrap();
            for ((&g, &u), &y) in gate.iter().zip(&up).zip(&got) {
                let want = g as f64 * u as f64 / (1.0 + (-(g as f64)).exp());
                // Relative 2e-6 (f32's rounding of g log2(e) grows with |g|), or 1e-12 for the
                // vanishing values of very negative gates.
                assert!(
                    (y as f64 - want).abs() <= 2e-6 * want.abs() + 1e-12,
                    "{isa}: silu({g}) * {u}: {y} vs {want}"
                );
            }
        }
        assert!(swiglu(&[1.0], &[1.0, 2.0], 1, Isa::best()).is_none());
    }

    /// Plain causal softmax attention in f64, the reference: output and column sums.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: HostShape,
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let d = s.head_dim;
        let mut out = vec![0f32; q.len()];
        let mut cols = vec![0f64; s.batch * s.heads * s.visible];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let g = b * s.kv_heads + h / (s.heads / s.kv_heads);
                for i in 0..s.queries {
                    let qi = &q[((b * s.heads + h) * s.queries + i) * d..][..d];
                    let seen = s.visible - s.queries + i + 1;
                    let scores: Vec<f64> = (0..seen)
                        .map(|j| {
                            qi.iter()
                                .zip(&k[(g * s.keys + j) * d..][..d])
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    let o = &mut out[((b * s.heads + h) * s.queries + i) * d..][..d];
                    for (j, w) in weights.iter().enumerate() {
                        cols[(b * s.heads + h) * s.visible + j] += w / total;
                        for (x, &y) in o.iter_mut().zip(&v[(g * s.keys + j) * d..][..d]) {
                            *x += (w / total * y as f64) as f32;
                        }
                    }
                }
            }
        }
        (out, cols.into_iter().map(|c| c as f32).collect())
    }

    fn filled(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn exp2_matches_the_standard_library_to_a_few_ulps() {
        for i in 0..=200_000 {
            let x = -130.0 * i as f32 / 200_000.0;
            let (ours, std) = (exp2::<false>(splat(x))[0], x.exp2());
            if x > -126.0 {
                assert!((ours - std).abs() <= 3e-7 * std, "2^{x}: {ours} vs {std}");
            } else {
                assert!(ours <= 2.0 * std.max(f32::MIN_POSITIVE), "2^{x}: {ours}");
            }
        }
        assert_eq!(exp2::<false>(splat(f32::NEG_INFINITY)), splat(0.0));
        assert_eq!(exp2::<true>(splat(0.0)), splat(1.0));
    }

    #[test]
    fn causal_attention_equals_the_f64_reference_across_shapes_and_threads() {
        // Partial blocks and tiles, older keys before the chunk, a visible prefix shorter than the
        // stored keys, GQA and MQA, every head size.
        let cases = [
            (1, 4, 4, 1, 1, 1, 32),
            (2, 4, 2, 70, 70, 70, 16),
            (1, 8, 1, 130, 200, 203, 64),
            (1, 6, 3, 129, 129, 190, 128),
            (2, 2, 2, 5, 300, 301, 32),
        ];
        for (seed, &(batch, heads, kv_heads, queries, visible, keys, head_dim)) in
            cases.iter().enumerate()
        {
            let shape = HostShape {
                batch,
                heads,
                kv_heads,
                queries,
                keys,
                visible,
                head_dim,
            };
            let q = filled(batch * heads * queries * head_dim, seed as u32 * 3);
            let k = filled(batch * kv_heads * keys * head_dim, seed as u32 * 3 + 1);
            let v = filled(k.len(), seed as u32 * 3 + 2);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let (want, want_cols) = reference(&q, &k, &v, shape, scale);
            for (threads, isa) in [1, 3]
                .into_iter()
                .flat_map(|t| Isa::available().into_iter().map(move |i| (t, i)))
            {
                let plain = causal_attention(&q, &k, &v, shape, scale, false, threads, isa)
                    .expect("a supported shape");
                let observed = causal_attention(&q, &k, &v, shape, scale, true, threads, isa)
                    .expect("a supported shape");
                assert!(plain.column_sums.is_none());
                assert_eq!(
                    plain.output, observed.output,
                    "asking for column sums changes no output"
                );
                let worst = plain
                    .output
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    worst < 2e-5,
                    "{shape:?} on {threads} threads, {isa}: off by {worst}"
                );
                let cols = observed.column_sums.expect("asked for");
                assert_eq!(cols.len(), batch * heads * visible);
                let worst = cols
                    .iter()
                    .zip(&want_cols)
                    .map(|(a, b)| (a - b).abs() / b.max(1.0))
                    .fold(0.0, f32::max);
                assert!(
                    worst < 2e-5,
                    "{shape:?} on {threads} threads, {isa}: column sums off by {worst}"
                );
            }
        }
    }

    #[test]
    fn unsupported_shapes_are_declined() {
        let shape = HostShape {
            batch: 1,
            heads: 2,
            kv_heads: 1,
            queries: 3,
            keys: 3,
            visible: 3,
            head_dim: 24,
        };
        let x = vec![0.0; 2 * 3 * 24];
        assert!(
            causal_attention(&x, &x[..72], &x[..72], shape, 1.0, false, 1, Isa::best()).is_none()
        );
        let shape = HostShape {
            head_dim: 32,
            visible: 2,
            ..shape
        };
        let (q, kv) = (vec![0.0; 2 * 3 * 32], vec![0.0; 3 * 32]);
        assert!(
            causal_attention(&q, &kv, &kv, shape, 1.0, false, 1, Isa::best()).is_none(),
            "more queries than visible keys"
        );
        let empty = HostShape { batch: 0, ..shape };
        assert!(
            causal_attention(&[], &[], &[], empty, 1.0, true, 2, Isa::best()).is_none(),
            "an empty batch"
        );
    }
}
