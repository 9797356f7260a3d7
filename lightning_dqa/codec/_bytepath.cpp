// Fused DQA byte path: one pass from float32 activations to packed main codes + Huffman-coded shifting
// errors, and one pass back to float32 values. Built at install time by setup.py (or, in a source tree
// without that build, at first use by lightning_dqa/codec/native.py) with portable flags (g++ -O3, no
// -march=native, no fast-math, no FP contraction; lightning_dqa/codec/_build.py) and called through ctypes;
// the pure numpy/torch path in lightning_dqa/codec/blob.py and layer.py writes the same bytes and is the
// reference.
//
// dqa_abi() reports the exported signatures, derived by the compiler from the functions' own types, so the
// Python binding builds its ctypes argument lists from it and refuses a library whose signatures differ
// from the calls it makes (native.py). Bump DQA_ABI_VERSION when an argument's meaning changes but not its type.
//
// Layout of the tensor: (outer, C, inner) row-major, channel axis in the middle. Main codes are n-bit
// fields, most significant bit first, row-major over the whole tensor; the errors of the important
// channels are coded row-major over (outer, k, inner), which is the order in which a row-major walk of
// (outer, C, inner) meets them, so one walk writes both streams.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <thread>
#include <vector>

#define DQA_ABI_VERSION 1

// The two walks are compiled twice on x86-64 Linux, for the baseline ISA and for AVX2, and the loader picks the
// one the CPU runs (GCC/Clang target_clones, an ifunc): the portable build gets most of -march=native's speed
// (examples/bench_native_flags.py) with the same bytes, since every per-value operation is exact IEEE
// arithmetic whatever the vector width. -DDQA_NO_MULTIVERSION builds the baseline only.
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute) && !defined(DQA_NO_MULTIVERSION)
#if __has_attribute(target_clones)
#define DQA_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef DQA_CLONES
#define DQA_CLONES
#endif
#ifndef DQA_SOURCE_SHA
#define DQA_SOURCE_SHA "unknown"  // setup.py and native.py pass the hash of this file
#endif

namespace {

// MSB-first bit writer with a 64-bit accumulator; codes are at most 32 bits.
struct Writer {
    uint8_t* out;
    uint64_t acc = 0;
    int nacc = 0;      // bits held in acc (right-aligned), < 32 after every put
    int64_t nbytes = 0;  // bytes flushed

    inline void put(uint32_t code, int len) {
        acc = (acc << len) | code;
        nacc += len;
        if (nacc >= 32) {
            nacc -= 32;
            uint32_t w = static_cast<uint32_t>(acc >> nacc);
            out[nbytes] = static_cast<uint8_t>(w >> 24);
            out[nbytes + 1] = static_cast<uint8_t>(w >> 16);
            out[nbytes + 2] = static_cast<uint8_t>(w >> 8);
            out[nbytes + 3] = static_cast<uint8_t>(w);
            nbytes += 4;
        }
    }
    inline int64_t bits() const { return 8 * nbytes + nacc; }
    inline void finish() {  // zero-pad the last byte
        while (nacc > 0) {
            int take = nacc >= 8 ? 8 : nacc;
            out[nbytes++] = static_cast<uint8_t>(((acc >> (nacc - take)) << (8 - take)) & 0xFF);
            nacc -= take;
        }
    }
};

// MSB-first bit reader over a 64-bit buffer, refilled 8 bytes at a time; bits past the end read as zeros
// (the caller checks the positions it reaches).
struct Reader {
    const uint8_t* in;
    int64_t size;
    int64_t next = 0;  // next byte to load
    uint64_t buf = 0;  // unread bits, left-aligned
    int nbuf = 0;      // valid bits in buf

    inline void refill() {  // afterwards nbuf >= 57
        if (next + 8 <= size) {
            uint64_t w;
            std::memcpy(&w, in + next, 8);
            w = __builtin_bswap64(w);
            buf |= w >> nbuf;  // bits beyond the whole bytes taken are the true next bits: OR-ing them again is harmless
            const int take = (63 - nbuf) >> 3;
            next += take;
            nbuf += 8 * take;
            return;
        }
        while (nbuf <= 56) {
            const uint64_t byte = next < size ? in[next] : 0;
            ++next;
            buf |= byte << (56 - nbuf);
            nbuf += 8;
        }
    }
    inline uint32_t peek(int len) const { return uint32_t(buf >> (64 - len)); }
    inline void skip(int len) {
        buf <<= len;
        nbuf -= len;
    }
    inline int64_t bitpos() const { return 8 * next - nbuf; }
};


struct Layout {
    int64_t outer, channels, inner;
    const uint8_t* important;
    int n, m, is_signed;
    int64_t k;  // important channels
};

// --------------------------------------------------------------------------------------------- encoding
// Write `count` n-bit codes (two's complement, masked): 8 per put for n <= 4, 4 for n <= 8, else one by one.
// std::nearbyint(v) in round-to-nearest (ties to even, as torch.round), written with SSE2 arithmetic so that the
// portable x86-64 build vectorizes it (nearbyint is a libm call below SSE4.1). |v| + 2^23 has a unit ulp for
// |v| < 2^23, so the addition rounds |v| to an integer and the subtraction is exact; from 2^23 up every float
// is an integer already. Needs IEEE evaluation: no -ffast-math (it would fold (a + 2^23) - 2^23 to a); with
// -fno-trapping-math (no value changes) the compiler vectorizes the compare-and-select. Checked equal to
// std::nearbyint for all 2^32 float bit patterns (baseline and -march=native builds).
inline float round_half_even(float v) {
    const float two23 = 8388608.0f;
    const float a = std::fabs(v);
    const float r = (a + two23) - two23;  // computed for every lane, then selected: the loop stays branch-free
    return std::copysign(a < two23 ? r : a, v);  // NaN: a is NaN
}

inline void put_codes(Writer& w, const int32_t* sc, int64_t count, int n, int32_t nmask) {
    int64_t i = 0;
    if (n <= 4) {
        for (; i + 8 <= count; i += 8) {
            uint32_t v = 0;
            for (int j = 0; j < 8; ++j) v = (v << n) | uint32_t(sc[i + j] & nmask);
            w.put(v, 8 * n);
        }
    } else if (n <= 8) {
        for (; i + 4 <= count; i += 4) {
            uint32_t v = 0;
            for (int j = 0; j < 4; ++j) v = (v << n) | uint32_t(sc[i + j] & nmask);
            w.put(v, 4 * n);
        }
    }
    for (; i < count; ++i) w.put(uint32_t(sc[i] & nmask), n);
}

struct EncodePart {
    int64_t o0, o1;       // outer range
    uint8_t* main_out;    // where this part's main codes start (a whole byte: the caller checks alignment)
    uint8_t* err_out;     // its own Huffman buffer, or the raw-symbol array at its first symbol
    int64_t* offsets;     // all chunk offsets; this part writes those of the chunks starting in it (local bits)
    int64_t sym0;         // index of its first error symbol
    int64_t err_bits = 0;
    int nan = 0;
};

// Codes of every pair of symbols, first symbol in the high bits: one put writes two symbols.
struct PairTable {
    std::vector<uint32_t> code;
    std::vector<uint8_t> len;
    PairTable(const uint32_t* hcodes, const uint8_t* hlens, int m) : code(size_t(1) << (2 * m)), len(code.size()) {
        const int32_t a = 1 << m;
        for (int32_t s = 0; s < a; ++s)
            for (int32_t t = 0; t < a; ++t) {
                code[(s << m) | t] = (hcodes[s] << hlens[t]) | hcodes[t];
                len[(s << m) | t] = uint8_t(hlens[s] + hlens[t]);
            }
    }
};

DQA_CLONES
void encode_part(const float* x, const Layout& L, const float* inv_n, const float* inv_hi, const uint32_t* hcodes,
                 const uint8_t* hlens, const PairTable* pairs, int64_t chunk, EncodePart& P) {
    const int n = L.n, m = L.m;
    const float lo_n = L.is_signed ? -float(1 << (n - 1)) : 0.0f;
    const float hi_n = L.is_signed ? float((1 << (n - 1)) - 1) : float((1 << n) - 1);
    const float lo_h = L.is_signed ? -float(1 << (n + m - 1)) : 0.0f;
    const float hi_h = L.is_signed ? float((1 << (n + m - 1)) - 1) : float((1 << (n + m)) - 1);
    const int32_t nmask = (1 << n) - 1, emask = (1 << m) - 1;
    std::vector<int32_t> scratch(L.inner > 0 ? L.inner : 1), errs(L.inner > 0 ? L.inner : 1);
    int32_t* err = errs.data();
    Writer mw{P.main_out}, ew{P.err_out};
    const int64_t phase = P.sym0 % chunk;
    int64_t raw = 0, chunk_left = phase ? chunk - phase : 0, next_chunk = (P.sym0 + chunk - 1) / chunk;
    int nan = 0;
    for (int64_t o = P.o0; o < P.o1; ++o) {
        for (int64_t c = 0; c < L.channels; ++c) {
            const float* row = x + (o * L.channels + c) * L.inner;
            const bool imp = L.important[c] != 0;
            const float inv = imp ? inv_hi[c] : inv_n[c], lo = imp ? lo_h : lo_n, hi = imp ? hi_h : hi_n;
            int32_t* sc = scratch.data();
            for (int64_t i = 0; i < L.inner; ++i) {  // vectorizable: multiply, clamp, round half to even
                float v = row[i] * inv;
                nan |= (v != v);
                v = v < lo ? lo : (v > hi ? hi : v);  // NaN passes; integer bounds: clamp(round(v)) = round(clamp(v))
                sc[i] = static_cast<int32_t>(round_half_even(v));
            }
            if (imp) {  // split into main codes and errors (vectorizable), then code the errors
                for (int64_t i = 0; i < L.inner; ++i) {
                    err[i] = sc[i] & emask;
                    sc[i] >>= m;
                }
            }
            put_codes(mw, sc, L.inner, n, nmask);
            if (!imp) continue;
            if (hcodes == nullptr) {
                for (int64_t i = 0; i < L.inner; ++i) P.err_out[raw++] = static_cast<uint8_t>(err[i]);
                continue;
            }
            for (int64_t i = 0; i < L.inner;) {  // two symbols per put where the pair table exists
                if (chunk_left == 0) {
                    P.offsets[next_chunk++] = ew.bits();
                    chunk_left = chunk;
                }
                if (pairs != nullptr && chunk_left >= 2 && i + 1 < L.inner) {
                    const int32_t key = (err[i] << m) | err[i + 1];
                    ew.put(pairs->code[key], pairs->len[key]);
                    i += 2;
                    chunk_left -= 2;
                } else {
                    ew.put(hcodes[err[i]], hlens[err[i]]);
                    ++i;
                    --chunk_left;
                }
            }
        }
    }
    mw.finish();
    P.err_bits = ew.bits();
    ew.finish();
    P.nan = nan;
}

// OR `nbits` bits of `src` (zero padded) into `dst` starting at bit `base` (dst zero beyond `base`).
void append_bits(uint8_t* dst, int64_t base, const uint8_t* src, int64_t nbits) {
    const int64_t nbytes = (nbits + 7) / 8, b = base >> 3;
    const int shift = int(base & 7);
    if (shift == 0) {
        std::memcpy(dst + b, src, nbytes);
        return;
    }
    for (int64_t j = 0; j < nbytes; ++j) {
        dst[b + j] |= uint8_t(src[j] >> shift);
        dst[b + j + 1] = uint8_t(src[j] << (8 - shift));
    }
}

// --------------------------------------------------------------------------------------------- decoding
// Read `count` n-bit codes, sign-extended: 8 per refill for n <= 7, 4 for n <= 14, else one by one.
inline void get_codes(Reader& r, int32_t* sc, int64_t count, int n, int32_t sign_bit) {
    const uint32_t mask = (1u << n) - 1;
    int64_t i = 0;
    const int group = n <= 7 ? 8 : (n <= 14 ? 4 : 1);
    if (group > 1) {
        for (; i + group <= count; i += group) {
            if (r.nbuf < 56) r.refill();
            const uint64_t bits = r.buf >> (64 - group * n);
            for (int j = 0; j < group; ++j) {
                const int32_t q = int32_t((bits >> ((group - 1 - j) * n)) & mask);
                sc[i + j] = (q ^ sign_bit) - sign_bit;
            }
            r.skip(group * n);
        }
    }
    for (; i < count; ++i) {
        if (r.nbuf < 16) r.refill();
        sc[i] = (int32_t(r.peek(n)) ^ sign_bit) - sign_bit;
        r.skip(n);
    }
}

struct DecodePart {
    int64_t o0, o1;
    int64_t sym0;
    int64_t start = 0, end = 0;  // bit positions of its first error symbol and after its last
    int status = 0;
};

// For every W-bit string: how many whole codes (up to K) it starts with, their symbols and their total length.
struct MultiTable {
    static constexpr int W = 12, K = 4;
    std::vector<uint8_t> count, len, syms;
    MultiTable(const int32_t* sym_table, const uint8_t* len_table, int lmax)
        : count(size_t(1) << W), len(count.size()), syms(count.size() * K) {
        for (uint32_t v = 0; v < (1u << W); ++v) {
            int pos = 0, cnt = 0;
            while (cnt < K) {
                const uint32_t key = ((v << pos) & ((1u << W) - 1)) >> (W - lmax);
                const int32_t sym = sym_table[key];
                if (sym < 0 || pos + len_table[key] > W) break;  // an invalid or a cut code: decoded one by one
                syms[size_t(v) * K + cnt++] = uint8_t(sym);
                pos += len_table[key];
            }
            count[v] = uint8_t(cnt);
            len[v] = uint8_t(pos);
        }
    }
};

DQA_CLONES
void decode_part(const uint8_t* main_in, int64_t main_bytes, const uint8_t* err_in, int64_t err_bytes,
                 int64_t err_bits, const int64_t* offsets, int64_t chunk, const int32_t* sym_table,
                 const uint8_t* len_table, int lmax, const MultiTable* multi, const Layout& L, const float* scale_n,
                 const float* scale_hi, float* out, DecodePart& P) {
    const int n = L.n, m = L.m;
    const int64_t mbit = P.o0 * L.channels * L.inner * n;
    Reader mr{main_in, main_bytes, mbit >> 3}, er{err_in, err_bytes};
    mr.refill();
    mr.skip(int(mbit & 7));
    const int32_t sign_bit = L.is_signed ? (1 << (n - 1)) : 0;
    const int64_t phase = P.sym0 % chunk;
    int64_t raw = P.sym0, chunk_left = phase ? chunk - phase : 0, next_chunk = (P.sym0 + chunk - 1) / chunk;
    if (sym_table != nullptr && L.k > 0 && L.inner > 0 && P.o0 < P.o1) {
        const int64_t start = offsets[P.sym0 / chunk];  // the chunk holding sym0, then `phase` codes skipped
        if (start < 0 || start > err_bits) { P.status = 1; return; }
        er.next = start >> 3;
        er.refill();
        er.skip(int(start & 7));
        for (int64_t j = 0; j < phase; ++j) {
            if (er.nbuf < 16) er.refill();
            const uint32_t key = er.peek(lmax);
            if (sym_table[key] < 0) { P.status = 2; return; }
            er.skip(len_table[key]);
        }
    }
    P.start = er.bitpos();
    std::vector<int32_t> scratch(L.inner > 0 ? L.inner : 1);
    std::vector<int32_t> errs(size_t(L.inner) + MultiTable::K);
    int32_t* sc = scratch.data();
    int32_t* eb = errs.data();
    for (int64_t o = P.o0; o < P.o1; ++o) {
        for (int64_t c = 0; c < L.channels; ++c) {
            float* row = out + (o * L.channels + c) * L.inner;
            get_codes(mr, sc, L.inner, n, sign_bit);
            if (L.important[c] == 0) {
                const float s = scale_n[c];
                for (int64_t i = 0; i < L.inner; ++i) row[i] = static_cast<float>(sc[i]) * s;  // vectorizable
                continue;
            }
            const float s = scale_hi[c];
            if (sym_table == nullptr) {
                for (int64_t i = 0; i < L.inner; ++i) sc[i] = sc[i] * (1 << m) + err_in[raw++];
            } else {
                for (int64_t i = 0; i < L.inner;) {
                    if (chunk_left == 0) {
                        if (er.bitpos() != offsets[next_chunk++]) { P.status = 1; return; }
                        chunk_left = chunk;
                    }
                    if (er.nbuf < 16) er.refill();
                    if (multi != nullptr && chunk_left >= MultiTable::K && i + MultiTable::K <= L.inner) {
                        const uint32_t key = er.peek(MultiTable::W);  // up to K whole codes in W bits
                        const int cnt = multi->count[key];
                        if (cnt > 0) {  // all K copied (fixed-size, branch-free); the next look-up overwrites the rest
                            const uint8_t* sy = &multi->syms[size_t(key) * MultiTable::K];
                            for (int j = 0; j < MultiTable::K; ++j) eb[i + j] = sy[j];
                            er.skip(multi->len[key]);
                            i += cnt;
                            chunk_left -= cnt;
                            continue;
                        }
                    }
                    const uint32_t key = er.peek(lmax);
                    const int32_t e = sym_table[key];
                    if (e < 0) { P.status = 2; return; }
                    er.skip(len_table[key]);
                    eb[i] = e;
                    ++i;
                    --chunk_left;
                }
                for (int64_t i = 0; i < L.inner; ++i) sc[i] = sc[i] * (1 << m) + eb[i];
            }
            for (int64_t i = 0; i < L.inner; ++i) row[i] = static_cast<float>(sc[i]) * s;
        }
    }
    P.end = er.bitpos();
}

// Outer splits for `threads` parts; one part when the main codes of a split would not start on a whole byte.
std::vector<int64_t> splits(const Layout& L, int threads) {
    if (threads < 1 || (L.channels * L.inner * L.n) % 8 != 0) threads = 1;
    if (threads > L.outer) threads = L.outer > 0 ? int(L.outer) : 1;
    std::vector<int64_t> at;
    for (int t = 0; t <= threads; ++t) at.push_back(L.outer * t / threads);
    return at;
}

}  // namespace

extern "C" {

// Returns 0, or -1 when a value is NaN (no code exists for it). `err_out` receives the error symbols as
// bytes instead of Huffman codes when `hcodes` is null (other entropy coders take them from there). The walk is
// split over `threads` ranges of the outer axis; their Huffman streams are joined bit-exactly afterwards.
int dqa_encode(const float* x, int64_t outer, int64_t channels, int64_t inner, const float* inv_n,
               const float* inv_hi, const uint8_t* important, int n, int m, int is_signed, const uint32_t* hcodes,
               const uint8_t* hlens, int64_t chunk, uint8_t* main_out, uint8_t* err_out, int64_t* offsets,
               int64_t* err_bits, int threads) {
    int64_t k = 0;
    for (int64_t c = 0; c < channels; ++c) k += important[c] != 0;
    const Layout L{outer, channels, inner, important, n, m, is_signed, k};
    const std::vector<int64_t> at = splits(L, threads);
    const int parts = int(at.size()) - 1;
    std::vector<EncodePart> P(parts);
    std::vector<std::vector<uint8_t>> bufs(parts);
    int lmax = 0;
    for (int s = 0; hcodes != nullptr && s < (1 << m); ++s) lmax = hlens[s] > lmax ? hlens[s] : lmax;
    for (int t = 0; t < parts; ++t) {
        const int64_t sym0 = at[t] * k * inner;
        P[t].o0 = at[t];
        P[t].o1 = at[t + 1];
        P[t].main_out = main_out + at[t] * channels * inner * n / 8;
        P[t].offsets = offsets;
        P[t].sym0 = sym0;
        if (hcodes == nullptr || t == 0) {
            P[t].err_out = hcodes == nullptr ? err_out + sym0 : err_out;
        } else {
            bufs[t].assign(((at[t + 1] - at[t]) * k * inner * lmax + 7) / 8 + 8, 0);
            P[t].err_out = bufs[t].data();
        }
    }
    std::unique_ptr<PairTable> pairs;
    if (hcodes != nullptr && m <= 6) pairs.reset(new PairTable(hcodes, hlens, m));  // 2 * max_len <= 32 always
    std::vector<std::thread> pool;
    for (int t = 1; t < parts; ++t)
        pool.emplace_back(encode_part, x, std::cref(L), inv_n, inv_hi, hcodes, hlens, pairs.get(), chunk,
                          std::ref(P[t]));
    encode_part(x, L, inv_n, inv_hi, hcodes, hlens, pairs.get(), chunk, P[0]);
    for (auto& th : pool) th.join();
    int64_t base = P[0].err_bits;
    int nan = P[0].nan;
    for (int t = 1; t < parts; ++t) {
        nan |= P[t].nan;
        if (hcodes == nullptr) continue;
        append_bits(err_out, base, P[t].err_out, P[t].err_bits);
        const int64_t first = (P[t].sym0 + chunk - 1) / chunk, last = (at[t + 1] * k * inner + chunk - 1) / chunk;
        for (int64_t j = first; j < last; ++j) offsets[j] += base;
        base += P[t].err_bits;
    }
    *err_bits = hcodes == nullptr ? 0 : base;
    return nan ? -1 : 0;
}

// Returns 0; 1 when a chunk does not start at its recorded offset, 2 when a bit string starts no code,
// 3 when the codes do not end exactly at `err_bits`. With `sym_table` null, `err_in` holds raw symbols.
int dqa_decode(const uint8_t* main_in, int64_t main_bytes, const uint8_t* err_in, int64_t err_bytes,
               int64_t err_bits, const int64_t* offsets, int64_t chunk, const int32_t* sym_table,
               const uint8_t* len_table, int lmax, int64_t outer, int64_t channels, int64_t inner,
               const float* scale_n, const float* scale_hi, const uint8_t* important, int n, int m, int is_signed,
               float* out, int threads) {
    int64_t k = 0;
    for (int64_t c = 0; c < channels; ++c) k += important[c] != 0;
    const Layout L{outer, channels, inner, important, n, m, is_signed, k};
    const std::vector<int64_t> at = splits(L, threads);
    const int parts = int(at.size()) - 1;
    std::vector<DecodePart> P(parts);
    for (int t = 0; t < parts; ++t) {
        P[t].o0 = at[t];
        P[t].o1 = at[t + 1];
        P[t].sym0 = at[t] * k * inner;
    }
    std::unique_ptr<MultiTable> multi;
    if (sym_table != nullptr && lmax <= MultiTable::W && m <= 8) multi.reset(new MultiTable(sym_table, len_table, lmax));
    std::vector<std::thread> pool;
    for (int t = 1; t < parts; ++t)
        pool.emplace_back(decode_part, main_in, main_bytes, err_in, err_bytes, err_bits, offsets, chunk, sym_table,
                          len_table, lmax, multi.get(), std::cref(L), scale_n, scale_hi, out, std::ref(P[t]));
    decode_part(main_in, main_bytes, err_in, err_bytes, err_bits, offsets, chunk, sym_table, len_table, lmax,
                multi.get(), L, scale_n, scale_hi, out, P[0]);
    for (auto& th : pool) th.join();
    for (int t = 0; t < parts; ++t) {
        if (P[t].status) return P[t].status;
        if (sym_table != nullptr && t + 1 < parts && P[t].end != P[t + 1].start) return 1;
    }
    if (sym_table != nullptr && P[parts - 1].end != err_bits) return 3;
    return 0;
}

}  // extern "C"

namespace {

// The ABI name of each argument type; an unlisted type fails to compile, so every type is named.
template <typename T>
struct AbiName;
template <>
struct AbiName<int32_t> { static std::string get() { return "i32"; } };
template <>
struct AbiName<int64_t> { static std::string get() { return "i64"; } };
template <>
struct AbiName<uint8_t> { static std::string get() { return "u8"; } };
template <>
struct AbiName<uint32_t> { static std::string get() { return "u32"; } };
template <>
struct AbiName<float> { static std::string get() { return "f32"; } };
template <typename T>
struct AbiName<T*> { static std::string get() { return AbiName<std::remove_const_t<T>>::get() + "*"; } };

// "name(arg,arg,...)->ret" from the function's type.
template <typename R, typename... A>
std::string signature(const char* name, R (*)(A...)) {
    const std::string args[] = {AbiName<A>::get()...};
    std::string s = std::string(name) + "(";
    for (size_t i = 0; i < sizeof...(A); ++i) s += (i ? "," : "") + args[i];
    return s + ")->" + AbiName<R>::get();
}

}  // namespace

extern "C" {

// "v<version>;dqa_encode(...)->i32;dqa_decode(...)->i32": what native.py checks before binding.
const char* dqa_abi() {
    static const std::string abi = "v" + std::to_string(DQA_ABI_VERSION) + ";" +
                                   signature("dqa_encode", &dqa_encode) + ";" + signature("dqa_decode", &dqa_decode);
    return abi.c_str();
}

// The sha256 prefix of the source this library was built from (native.py skips a stale bundled build).
const char* dqa_source_sha() { return DQA_SOURCE_SHA; }

}  // extern "C"
