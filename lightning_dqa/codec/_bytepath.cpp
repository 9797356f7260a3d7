// Fused DQA byte path: one pass from float32 activations to packed main codes + Huffman-coded shifting
// errors, and one pass back to float32 values. Compiled at first use by lightning_dqa/codec/native.py
// (g++ -O3, no fast-math, no FP contraction) and called through ctypes; the pure numpy/torch path in
// lightning_dqa/codec/blob.py and layer.py writes the same bytes and is the reference.
//
// Layout of the tensor: (outer, C, inner) row-major, channel axis in the middle. Main codes are n-bit
// fields, most significant bit first, row-major over the whole tensor; the errors of the important
// channels are coded row-major over (outer, k, inner), which is the order in which a row-major walk of
// (outer, C, inner) meets them, so one walk writes both streams.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

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
struct EncodePart {
    int64_t o0, o1;       // outer range
    uint8_t* main_out;    // where this part's main codes start (a whole byte: the caller checks alignment)
    uint8_t* err_out;     // its own Huffman buffer, or the raw-symbol array at its first symbol
    int64_t* offsets;     // all chunk offsets; this part writes those of the chunks starting in it (local bits)
    int64_t sym0;         // index of its first error symbol
    int64_t err_bits = 0;
    int nan = 0;
};

void encode_part(const float* x, const Layout& L, const float* inv_n, const float* inv_hi, const uint32_t* hcodes,
                 const uint8_t* hlens, int64_t chunk, EncodePart& P) {
    const int n = L.n, m = L.m;
    const float lo_n = L.is_signed ? -float(1 << (n - 1)) : 0.0f;
    const float hi_n = L.is_signed ? float((1 << (n - 1)) - 1) : float((1 << n) - 1);
    const float lo_h = L.is_signed ? -float(1 << (n + m - 1)) : 0.0f;
    const float hi_h = L.is_signed ? float((1 << (n + m - 1)) - 1) : float((1 << (n + m)) - 1);
    const int32_t nmask = (1 << n) - 1, emask = (1 << m) - 1;
    std::vector<int32_t> scratch(L.inner > 0 ? L.inner : 1);
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
            for (int64_t i = 0; i < L.inner; ++i) {  // vectorizable: multiply, round half to even, clamp
                float v = std::nearbyint(row[i] * inv);
                nan |= (v != v);
                v = v < lo ? lo : (v > hi ? hi : v);
                sc[i] = static_cast<int32_t>(v);
            }
            if (!imp) {  // four n-bit codes per put (4n <= 32 bits for n <= 8)
                int64_t i = 0;
                if (n <= 8) {
                    for (; i + 4 <= L.inner; i += 4) {
                        const uint32_t v = (uint32_t(sc[i] & nmask) << (3 * n)) |
                                           (uint32_t(sc[i + 1] & nmask) << (2 * n)) |
                                           (uint32_t(sc[i + 2] & nmask) << n) | uint32_t(sc[i + 3] & nmask);
                        mw.put(v, 4 * n);
                    }
                }
                for (; i < L.inner; ++i) mw.put(uint32_t(sc[i] & nmask), n);
                continue;
            }
            for (int64_t i = 0; i < L.inner; ++i) {
                const int32_t q = sc[i];
                mw.put(uint32_t((q >> m) & nmask), n);
                const int32_t e = q & emask;
                if (hcodes == nullptr) {
                    P.err_out[raw++] = static_cast<uint8_t>(e);
                    continue;
                }
                if (chunk_left == 0) {
                    P.offsets[next_chunk++] = ew.bits();
                    chunk_left = chunk;
                }
                --chunk_left;
                ew.put(hcodes[e], hlens[e]);
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
struct DecodePart {
    int64_t o0, o1;
    int64_t sym0;
    int64_t start = 0, end = 0;  // bit positions of its first error symbol and after its last
    int status = 0;
};

void decode_part(const uint8_t* main_in, int64_t main_bytes, const uint8_t* err_in, int64_t err_bytes,
                 int64_t err_bits, const int64_t* offsets, int64_t chunk, const int32_t* sym_table,
                 const uint8_t* len_table, int lmax, const Layout& L, const float* scale_n, const float* scale_hi,
                 float* out, DecodePart& P) {
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
    for (int64_t o = P.o0; o < P.o1; ++o) {
        for (int64_t c = 0; c < L.channels; ++c) {
            float* row = out + (o * L.channels + c) * L.inner;
            if (L.important[c] == 0) {
                const float s = scale_n[c];
                for (int64_t i = 0; i < L.inner; ++i) {
                    if (mr.nbuf < 16) mr.refill();
                    const int32_t q = (int32_t(mr.peek(n)) ^ sign_bit) - sign_bit;  // sign-extend the field
                    mr.skip(n);
                    row[i] = static_cast<float>(q) * s;
                }
                continue;
            }
            const float s = scale_hi[c];
            for (int64_t i = 0; i < L.inner; ++i) {
                if (mr.nbuf < 16) mr.refill();
                int32_t q = (int32_t(mr.peek(n)) ^ sign_bit) - sign_bit;
                mr.skip(n);
                int32_t e;
                if (sym_table == nullptr) {
                    e = err_in[raw++];
                } else {
                    if (chunk_left == 0) {
                        if (er.bitpos() != offsets[next_chunk++]) { P.status = 1; return; }
                        chunk_left = chunk;
                    }
                    --chunk_left;
                    if (er.nbuf < 16) er.refill();
                    const uint32_t key = er.peek(lmax);
                    e = sym_table[key];
                    if (e < 0) { P.status = 2; return; }
                    er.skip(len_table[key]);
                }
                q = q * (1 << m) + e;
                row[i] = static_cast<float>(q) * s;
            }
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
    std::vector<std::thread> pool;
    for (int t = 1; t < parts; ++t)
        pool.emplace_back(encode_part, x, std::cref(L), inv_n, inv_hi, hcodes, hlens, chunk, std::ref(P[t]));
    encode_part(x, L, inv_n, inv_hi, hcodes, hlens, chunk, P[0]);
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
    std::vector<std::thread> pool;
    for (int t = 1; t < parts; ++t)
        pool.emplace_back(decode_part, main_in, main_bytes, err_in, err_bytes, err_bits, offsets, chunk, sym_table,
                          len_table, lmax, std::cref(L), scale_n, scale_hi, out, std::ref(P[t]));
    decode_part(main_in, main_bytes, err_in, err_bytes, err_bits, offsets, chunk, sym_table, len_table, lmax, L,
                scale_n, scale_hi, out, P[0]);
    for (auto& th : pool) th.join();
    for (int t = 0; t < parts; ++t) {
        if (P[t].status) return P[t].status;
        if (sym_table != nullptr && t + 1 < parts && P[t].end != P[t + 1].start) return 1;
    }
    if (sym_table != nullptr && P[parts - 1].end != err_bits) return 3;
    return 0;
}

}  // extern "C"
