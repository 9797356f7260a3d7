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

}  // namespace

extern "C" {

// Returns 0, or -1 when a value is NaN (no code exists for it). `raw_err` receives the error symbols as
// bytes instead of Huffman codes when `hcodes` is null (other entropy coders take them from there).
int dqa_encode(const float* x, int64_t outer, int64_t channels, int64_t inner, const float* inv_n,
               const float* inv_hi, const uint8_t* important, int n, int m, int is_signed, const uint32_t* hcodes,
               const uint8_t* hlens, int64_t chunk, uint8_t* main_out, uint8_t* err_out, int64_t* offsets,
               int64_t* err_bits, int32_t* scratch) {
    const float lo_n = is_signed ? -float(1 << (n - 1)) : 0.0f;
    const float hi_n = is_signed ? float((1 << (n - 1)) - 1) : float((1 << n) - 1);
    const float lo_h = is_signed ? -float(1 << (n + m - 1)) : 0.0f;
    const float hi_h = is_signed ? float((1 << (n + m - 1)) - 1) : float((1 << (n + m)) - 1);
    const int32_t nmask = (1 << n) - 1, emask = (1 << m) - 1;
    Writer mw{main_out}, ew{err_out};
    int64_t symbols = 0, raw = 0, chunk_left = 0, next_chunk = 0;
    int nan = 0;
    for (int64_t o = 0; o < outer; ++o) {
        for (int64_t c = 0; c < channels; ++c) {
            const float* row = x + (o * channels + c) * inner;
            const bool imp = important[c] != 0;
            const float inv = imp ? inv_hi[c] : inv_n[c], lo = imp ? lo_h : lo_n, hi = imp ? hi_h : hi_n;
            for (int64_t i = 0; i < inner; ++i) {  // vectorizable: multiply, round half to even, clamp
                float v = std::nearbyint(row[i] * inv);
                nan |= (v != v);
                v = v < lo ? lo : (v > hi ? hi : v);
                scratch[i] = static_cast<int32_t>(v);
            }
            if (!imp) {  // four n-bit codes per put (4n <= 32 bits for n <= 8)
                int64_t i = 0;
                if (n <= 8) {
                    for (; i + 4 <= inner; i += 4) {
                        const uint32_t v = (uint32_t(scratch[i] & nmask) << (3 * n)) |
                                           (uint32_t(scratch[i + 1] & nmask) << (2 * n)) |
                                           (uint32_t(scratch[i + 2] & nmask) << n) | uint32_t(scratch[i + 3] & nmask);
                        mw.put(v, 4 * n);
                    }
                }
                for (; i < inner; ++i) mw.put(uint32_t(scratch[i] & nmask), n);
                continue;
            }
            for (int64_t i = 0; i < inner; ++i) {
                const int32_t q = scratch[i];
                mw.put(uint32_t((q >> m) & nmask), n);
                const int32_t e = q & emask;
                if (hcodes == nullptr) {
                    err_out[raw++] = static_cast<uint8_t>(e);
                    continue;
                }
                if (chunk_left == 0) {
                    offsets[next_chunk++] = ew.bits();
                    chunk_left = chunk;
                }
                --chunk_left;
                ew.put(hcodes[e], hlens[e]);
                ++symbols;
            }
        }
    }
    mw.finish();
    *err_bits = ew.bits();
    ew.finish();
    return nan ? -1 : 0;
}

// Returns 0; 1 when a chunk does not start at its recorded offset, 2 when a bit string starts no code,
// 3 when the codes do not end exactly at `err_bits`. With `sym_table` null, `err_in` holds raw symbols.
int dqa_decode(const uint8_t* main_in, int64_t main_bytes, const uint8_t* err_in, int64_t err_bytes,
               int64_t err_bits, const int64_t* offsets, int64_t chunk, const int32_t* sym_table,
               const uint8_t* len_table, int lmax, int64_t outer, int64_t channels, int64_t inner,
               const float* scale_n, const float* scale_hi, const uint8_t* important, int n, int m, int is_signed,
               float* out) {
    Reader mr{main_in, main_bytes}, er{err_in, err_bytes};
    mr.refill();
    er.refill();
    const int32_t sign_bit = is_signed ? (1 << (n - 1)) : 0;
    int64_t raw = 0, chunk_left = 0, next_chunk = 0;
    for (int64_t o = 0; o < outer; ++o) {
        for (int64_t c = 0; c < channels; ++c) {
            float* row = out + (o * channels + c) * inner;
            if (important[c] == 0) {
                const float s = scale_n[c];
                for (int64_t i = 0; i < inner; ++i) {
                    if (mr.nbuf < 16) mr.refill();
                    const int32_t q = (int32_t(mr.peek(n)) ^ sign_bit) - sign_bit;  // sign-extend the field
                    mr.skip(n);
                    row[i] = static_cast<float>(q) * s;
                }
                continue;
            }
            const float s = scale_hi[c];
            for (int64_t i = 0; i < inner; ++i) {
                if (mr.nbuf < 16) mr.refill();
                int32_t q = (int32_t(mr.peek(n)) ^ sign_bit) - sign_bit;
                mr.skip(n);
                int32_t e;
                if (sym_table == nullptr) {
                    e = err_in[raw++];
                } else {
                    if (chunk_left == 0) {
                        if (er.bitpos() != offsets[next_chunk++]) return 1;
                        chunk_left = chunk;
                    }
                    --chunk_left;
                    if (er.nbuf < 16) er.refill();
                    const uint32_t key = er.peek(lmax);
                    e = sym_table[key];
                    if (e < 0) return 2;
                    er.skip(len_table[key]);
                }
                q = q * (1 << m) + e;
                row[i] = static_cast<float>(q) * s;
            }
        }
    }
    if (sym_table != nullptr && er.bitpos() != err_bits) return 3;
    return 0;
}

}  // extern "C"
