// Fused CPU kernels of the Mamba-1 mixer: the selective scan (forward and a backward that
// recomputes the states) and the causal depthwise conv + SiLU (forward and backward).
//
// Why this shape:
// * Tensors are channel-last, (batch, length, channels), as they come out of nn.Linear, so
//   no transposes are needed around the kernels. Each work item handles 8 adjacent channels
//   at once (GCC/Clang vector extensions: AVX2 when compiled with -mavx2, two SSE ops
//   otherwise); B_t/C_t are per-(batch, time) scalars broadcast over those lanes, so the
//   output y_t = sum_n C_t[n] h_t[n] needs no horizontal reduction.
// * exp is a branch-free polynomial on vectors (libm's expf would not vectorise without
//   -ffast-math, which would also break the rounding trick used below).
// * The backward never stores (batch, length, channels, d_state) tensors: each work item
//   recomputes its own channels' states into a thread-local buffer, then runs the reverse
//   recurrence. dB/dC are summed over channels, so each work item writes lane-wise partial
//   sums into its own slice and Python adds the slices (deterministic, no atomics).
// * No torch headers: they take ~1 minute to compile; the functions are plain extern "C"
//   entry points called through ctypes with data pointers, strides and sizes.
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int W = 8;        // lanes (channels) per vector
constexpr int MAXN = 256;   // largest d_state (stack arrays); Python checks it
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

inline vf splat(float a) { return vf{} + a; }

inline vf load(const float* p, int nv) {
  vf v;
  if (nv == W) {
    std::memcpy(&v, p, sizeof(vf));
  } else {
    v = vf{};
    for (int k = 0; k < nv; ++k) v[k] = p[k];
  }
  return v;
}

inline void store(float* p, vf v, int nv) {
  if (nv == W) {
    std::memcpy(p, &v, sizeof(vf));
  } else {
    for (int k = 0; k < nv; ++k) p[k] = v[k];
  }
}

// 2^x for a vector: x = n + f with n = round(x), 2^f = e^(f ln2) from a degree-7 polynomial
// (Cephes expf coefficients, ~1 ulp on |f ln2| <= ln2/2), 2^n put into the exponent bits.
inline vf vexp2(vf x) {
  const vi under = x < -126.0f;
  x = x < -126.0f ? splat(-126.0f) : x;
  x = x > 127.0f ? splat(127.0f) : x;
  const vf n = (x + 12582912.0f) - 12582912.0f;  // round to nearest, |x| < 2^22
  const vf r = (x - n) * LN2;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf e = (p * r * r + r) + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  const vf res = e * (vf)bits;
  return under ? splat(0.0f) : res;  // 2^x < 2^-126: flush to zero
}

inline vf vsigmoid(vf z) { return 1.0f / (1.0f + vexp2(-z * LOG2E)); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sizes and strides (in elements) handed over from Python, in this order.
struct ScanDims {
  int64_t batch, len, dim, nstate;
  int64_t su_b, su_t, sdt_b, sdt_t, sz_b, sz_t, sB_b, sB_t, sC_b, sC_t;
  int64_t parts;  // backward: channel-block groups per batch row (dB/dC partial slices)
};

// Lane vectors of a (dim, N) row-major parameter for channels d0..d0+nv.
inline void load_param(const float* P, int64_t d0, int nv, int N, float scale, vf* out) {
  for (int n = 0; n < N; ++n) {
    vf v = vf{};
    for (int k = 0; k < nv; ++k) v[k] = P[(d0 + k) * N + n] * scale;
    out[n] = v;
  }
}

inline vf load_vec_param(const float* P, int64_t d0, int nv) {
  return P ? load(P + d0, nv) : vf{};
}

// ---------------------------------------------------------------------------------------
// Selective scan, forward. out (batch, len, dim) contiguous; last (batch, dim, N) or null.
template <int NS>
void scan_fwd_block(const ScanDims& s, const float* u, const float* delta, const float* A,
                    const float* Bm, const float* Cm, const float* D, const float* z,
                    float* out, float* last, int64_t b, int64_t d0, int nv) {
  const int N = NS > 0 ? NS : (int)s.nstate;
  vf A2[NS > 0 ? NS : MAXN];
  vf h[NS > 0 ? NS : MAXN];
  load_param(A, d0, nv, N, LOG2E, A2);
  for (int n = 0; n < N; ++n) h[n] = vf{};
  const vf Dv = load_vec_param(D, d0, nv);
  for (int64_t t = 0; t < s.len; ++t) {
    const float* Bt = Bm + b * s.sB_b + t * s.sB_t;
    const float* Ct = Cm + b * s.sC_b + t * s.sC_t;
    const vf uu = load(u + b * s.su_b + t * s.su_t + d0, nv);
    const vf dt = load(delta + b * s.sdt_b + t * s.sdt_t + d0, nv);
    const vf du = dt * uu;
    vf y0 = vf{}, y1 = vf{};
    int n = 0;
    for (; n + 1 < N; n += 2) {
      h[n] = vexp2(dt * A2[n]) * h[n] + du * Bt[n];
      h[n + 1] = vexp2(dt * A2[n + 1]) * h[n + 1] + du * Bt[n + 1];
      y0 += h[n] * Ct[n];
      y1 += h[n + 1] * Ct[n + 1];
    }
    if (n < N) {
      h[n] = vexp2(dt * A2[n]) * h[n] + du * Bt[n];
      y0 += h[n] * Ct[n];
    }
    vf y = y0 + y1 + Dv * uu;
    if (z) {
      const vf zz = load(z + b * s.sz_b + t * s.sz_t + d0, nv);
      y = y * zz * vsigmoid(zz);
    }
    store(out + (b * s.len + t) * s.dim + d0, y, nv);
  }
  if (last)
    for (int k = 0; k < nv; ++k)
      for (int n = 0; n < N; ++n) last[(b * s.dim + d0 + k) * N + n] = h[n][k];
}

template <int NS>
void scan_fwd_impl(const ScanDims& s, const float* u, const float* delta, const float* A,
                   const float* Bm, const float* Cm, const float* D, const float* z, float* out,
                   float* last, int nthreads) {
  const int64_t nblk = ceil_div(s.dim, W);
  const int64_t items = s.batch * nblk;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t b = i / nblk, d0 = (i % nblk) * W;
    const int nv = (int)(s.dim - d0 < W ? s.dim - d0 : W);
    scan_fwd_block<NS>(s, u, delta, A, Bm, Cm, D, z, out, last, b, d0, nv);
  }
}

// ---------------------------------------------------------------------------------------
// Selective scan, backward. dout (batch, len, dim) contiguous. Outputs: du, ddelta, dz
// (batch, len, dim) contiguous; dA_part (batch, dim, N) and dD_part (batch, dim) to be summed
// over batch; dB_part, dC_part (batch, parts, len, N) to be summed over parts.
template <int NS>
void scan_bwd_item(const ScanDims& s, const float* u, const float* delta, const float* A,
                   const float* Bm, const float* Cm, const float* D, const float* z,
                   const float* dout, float* du, float* ddelta, float* dz, float* dA_part,
                   float* dD_part, float* dB_part, float* dC_part, int64_t b, int64_t p,
                   std::vector<vf>& hs, std::vector<vf>& es, std::vector<vf>& dBacc,
                   std::vector<vf>& dCacc) {
  const int N = NS > 0 ? NS : (int)s.nstate;
  const int64_t L = s.len;
  const int64_t nblk = ceil_div(s.dim, W);
  const int64_t per = ceil_div(nblk, s.parts);
  const int64_t j0 = p * per, j1 = (p + 1) * per < nblk ? (p + 1) * per : nblk;
  const size_t cells = (size_t)L * N;
  if (hs.size() < cells) hs.resize(cells);
  if (es.size() < cells) es.resize(cells);
  dBacc.assign(cells, vf{});
  dCacc.assign(cells, vf{});
  vf A2[NS > 0 ? NS : MAXN], Av[NS > 0 ? NS : MAXN], h[NS > 0 ? NS : MAXN];
  vf g[NS > 0 ? NS : MAXN], dAacc[NS > 0 ? NS : MAXN];
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t d0 = j * W;
    const int nv = (int)(s.dim - d0 < W ? s.dim - d0 : W);
    load_param(A, d0, nv, N, 1.0f, Av);
    for (int n = 0; n < N; ++n) A2[n] = Av[n] * LOG2E;
    const vf Dv = load_vec_param(D, d0, nv);
    // pass 1: the states h_t of these channels, into the thread-local buffer
    for (int n = 0; n < N; ++n) h[n] = vf{};
    for (int64_t t = 0; t < L; ++t) {
      const float* Bt = Bm + b * s.sB_b + t * s.sB_t;
      const vf uu = load(u + b * s.su_b + t * s.su_t + d0, nv);
      const vf dt = load(delta + b * s.sdt_b + t * s.sdt_t + d0, nv);
      const vf dtu = dt * uu;
      vf* ht = hs.data() + t * N;
      vf* et = es.data() + t * N;
      for (int n = 0; n < N; ++n) {
        const vf e = vexp2(dt * A2[n]);
        h[n] = e * h[n] + dtu * Bt[n];
        ht[n] = h[n];
        et[n] = e;
      }
    }
    // pass 2: reverse recurrence; g[n] carries dL/dh_t[n] back in time
    for (int n = 0; n < N; ++n) g[n] = dAacc[n] = vf{};
    vf dDacc = vf{};
    for (int64_t t = L - 1; t >= 0; --t) {
      const float* Bt = Bm + b * s.sB_b + t * s.sB_t;
      const float* Ct = Cm + b * s.sC_b + t * s.sC_t;
      const vf uu = load(u + b * s.su_b + t * s.su_t + d0, nv);
      const vf dt = load(delta + b * s.sdt_b + t * s.sdt_t + d0, nv);
      const int64_t row = (b * L + t) * s.dim + d0;
      vf dy = load(dout + row, nv);
      const vf* ht = hs.data() + t * N;
      const vf* hp = t > 0 ? hs.data() + (t - 1) * N : nullptr;
      const vf* et = es.data() + t * N;
      if (z) {  // out = y * silu(z): recompute y
        vf y0 = vf{}, y1 = vf{};
        int n = 0;
        for (; n + 1 < N; n += 2) {
          y0 += ht[n] * Ct[n];
          y1 += ht[n + 1] * Ct[n + 1];
        }
        if (n < N) y0 += ht[n] * Ct[n];
        const vf y = y0 + y1 + Dv * uu;
        const vf zz = load(z + b * s.sz_b + t * s.sz_t + d0, nv);
        const vf sg = vsigmoid(zz);
        store(dz + row, dy * y * sg * (1.0f + zz * (1.0f - sg)), nv);
        dy = dy * zz * sg;
      }
      dDacc += dy * uu;
      const vf dtu = dt * uu;
      vf sB = vf{}, sA = vf{};  // sum_n g_n B_t[n] ; sum_n A[n] h_{t-1}[n] g_n e^{dt A[n]}
      vf* dBt = dBacc.data() + t * N;
      vf* dCt = dCacc.data() + t * N;
      for (int n = 0; n < N; ++n) {
        const vf gn = g[n] + dy * Ct[n];  // total dL/dh_t[n]
        dCt[n] += dy * ht[n];
        dBt[n] += gn * dtu;
        sB += gn * Bt[n];
        const vf w = gn * et[n];  // dL/dh_{t-1}[n] through the decay
        if (hp) {
          const vf q = hp[n] * w;
          sA += Av[n] * q;
          dAacc[n] += dt * q;
        }
        g[n] = w;
      }
      store(du + row, dy * Dv + sB * dt, nv);
      store(ddelta + row, sB * uu + sA, nv);
    }
    for (int k = 0; k < nv; ++k) {
      for (int n = 0; n < N; ++n) dA_part[(b * s.dim + d0 + k) * N + n] = dAacc[n][k];
      if (dD_part) dD_part[b * s.dim + d0 + k] = dDacc[k];
    }
  }
  // lane sums of the channel-summed gradients into this item's own slice
  float* dBo = dB_part + (b * s.parts + p) * L * N;
  float* dCo = dC_part + (b * s.parts + p) * L * N;
  for (size_t c = 0; c < cells; ++c) {
    float sb = 0.f, sc = 0.f;
    for (int k = 0; k < W; ++k) {
      sb += dBacc[c][k];
      sc += dCacc[c][k];
    }
    dBo[c] = sb;
    dCo[c] = sc;
  }
}

template <int NS>
void scan_bwd_impl(const ScanDims& s, const float* u, const float* delta, const float* A,
                   const float* Bm, const float* Cm, const float* D, const float* z,
                   const float* dout, float* du, float* ddelta, float* dz, float* dA_part,
                   float* dD_part, float* dB_part, float* dC_part, int nthreads) {
  const int64_t items = s.batch * s.parts;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<vf> hs, es, dBacc, dCacc;  // per-thread scratch, reused across items
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; ++i)
      scan_bwd_item<NS>(s, u, delta, A, Bm, Cm, D, z, dout, du, ddelta, dz, dA_part, dD_part,
                        dB_part, dC_part, i / s.parts, i % s.parts, hs, es, dBacc, dCacc);
  }
}

// ---------------------------------------------------------------------------------------
// Causal depthwise conv + SiLU, channel-last: out[b,t,d] = silu(bias[d] +
// sum_k w[d,k] x[b, t-K+1+k, d]) (what Conv1d(groups=dim, padding=K-1) gives, cut to len).
struct ConvDims {
  int64_t batch, len, dim, width, sx_b, sx_t;
};

constexpr int MAXK = 16;

inline void load_conv_weights(const float* w, int64_t d0, int nv, int K, vf* wv) {
  for (int k = 0; k < K; ++k) {
    vf v = vf{};
    for (int l = 0; l < nv; ++l) v[l] = w[(d0 + l) * K + k];
    wv[k] = v;
  }
}

inline vf conv_pre(const ConvDims& s, const float* x, const vf* wv, vf bv, int64_t b, int64_t t,
                   int64_t d0, int nv) {
  const int K = (int)s.width;
  vf acc = bv;
  for (int k = 0; k < K; ++k) {
    const int64_t tt = t - (K - 1) + k;
    if (tt >= 0) acc += wv[k] * load(x + b * s.sx_b + tt * s.sx_t + d0, nv);
  }
  return acc;
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for an unsupported size (Python validates before calling).
int xatl_scan_fwd(const int64_t* dims, const float* u, const float* delta, const float* A,
                  const float* Bm, const float* Cm, const float* D, const float* z, float* out,
                  float* last, int nthreads) {
  ScanDims s;
  std::memcpy(&s, dims, sizeof(ScanDims));
  if (s.nstate < 1 || s.nstate > MAXN) return 1;
  if (s.nstate == 16)
    scan_fwd_impl<16>(s, u, delta, A, Bm, Cm, D, z, out, last, nthreads);
  else
    scan_fwd_impl<0>(s, u, delta, A, Bm, Cm, D, z, out, last, nthreads);
  return 0;
}

int xatl_scan_bwd(const int64_t* dims, const float* u, const float* delta, const float* A,
                  const float* Bm, const float* Cm, const float* D, const float* z,
                  const float* dout, float* du, float* ddelta, float* dz, float* dA_part,
                  float* dD_part, float* dB_part, float* dC_part, int nthreads) {
  ScanDims s;
  std::memcpy(&s, dims, sizeof(ScanDims));
  if (s.nstate < 1 || s.nstate > MAXN || s.parts < 1) return 1;
  if (s.nstate == 16)
    scan_bwd_impl<16>(s, u, delta, A, Bm, Cm, D, z, dout, du, ddelta, dz, dA_part, dD_part,
                      dB_part, dC_part, nthreads);
  else
    scan_bwd_impl<0>(s, u, delta, A, Bm, Cm, D, z, dout, du, ddelta, dz, dA_part, dD_part,
                     dB_part, dC_part, nthreads);
  return 0;
}

// out (batch, len, dim) contiguous.
int xatl_conv_fwd(const int64_t* dims, const float* x, const float* w, const float* bias,
                  float* out, int nthreads) {
  ConvDims s;
  std::memcpy(&s, dims, sizeof(ConvDims));
  if (s.width < 1 || s.width > MAXK) return 1;
  const int64_t nblk = ceil_div(s.dim, W);
  const int64_t items = s.batch * nblk;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t b = i / nblk, d0 = (i % nblk) * W;
    const int nv = (int)(s.dim - d0 < W ? s.dim - d0 : W);
    vf wv[MAXK];
    load_conv_weights(w, d0, nv, (int)s.width, wv);
    const vf bv = load_vec_param(bias, d0, nv);
    for (int64_t t = 0; t < s.len; ++t) {
      const vf a = conv_pre(s, x, wv, bv, b, t, d0, nv);
      store(out + (b * s.len + t) * s.dim + d0, a * vsigmoid(a), nv);
    }
  }
  return 0;
}

// dx (batch, len, dim) contiguous (fully written); dw_part (batch, dim, width) and db_part
// (batch, dim) are summed over batch by the caller. dout contiguous. Runs backwards in time
// keeping the last K conv-output gradients, so dx[t] = sum_j w[K-1-j] g[t+j] is written once.
int xatl_conv_bwd(const int64_t* dims, const float* x, const float* w, const float* bias,
                  const float* dout, float* dx, float* dw_part, float* db_part, int nthreads) {
  ConvDims s;
  std::memcpy(&s, dims, sizeof(ConvDims));
  if (s.width < 1 || s.width > MAXK) return 1;
  const int K = (int)s.width;
  const int64_t nblk = ceil_div(s.dim, W);
  const int64_t items = s.batch * nblk;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t b = i / nblk, d0 = (i % nblk) * W;
    const int nv = (int)(s.dim - d0 < W ? s.dim - d0 : W);
    vf wv[MAXK], dw[MAXK], gwin[MAXK];  // gwin[j] = g[t + j]
    load_conv_weights(w, d0, nv, K, wv);
    for (int k = 0; k < K; ++k) dw[k] = gwin[k] = vf{};
    const vf bv = load_vec_param(bias, d0, nv);
    vf db = vf{};
    for (int64_t t = s.len - 1; t >= 0; --t) {
      const vf a = conv_pre(s, x, wv, bv, b, t, d0, nv);
      const vf sg = vsigmoid(a);
      const vf g = load(dout + (b * s.len + t) * s.dim + d0, nv) * sg * (1.0f + a * (1.0f - sg));
      for (int j = K - 1; j > 0; --j) gwin[j] = gwin[j - 1];
      gwin[0] = g;
      db += g;
      vf acc = vf{};
      for (int j = 0; j < K; ++j) acc += wv[K - 1 - j] * gwin[j];
      store(dx + (b * s.len + t) * s.dim + d0, acc, nv);
      for (int k = 0; k < K; ++k) {
        const int64_t tt = t - (K - 1) + k;
        if (tt >= 0) dw[k] += g * load(x + b * s.sx_b + tt * s.sx_t + d0, nv);
      }
    }
    for (int l = 0; l < nv; ++l) {
      for (int k = 0; k < K; ++k) dw_part[(b * s.dim + d0 + l) * K + k] = dw[k][l];
      if (db_part) db_part[b * s.dim + d0 + l] = db[l];
    }
  }
  return 0;
}

}  // extern "C"
