/* Philox4x32-10 on a range of counters, for zo2.optim.rng on the CPU.
 *
 * The same function as zo2.optim.rng.philox4x32 (the pure-torch reference, which defines it): counter
 * (m_lo, m_hi, 0, 0) for m in [m0, m0 + count), key (k0, k1); round keys bumped by the Weyl constants. Integer
 * arithmetic only, so the words are bit-identical to the reference's; the floats (uniforms, Box-Muller) stay in
 * torch. Output: out[w * count + i] = word w of counter m0 + i, as int64 holding a uint32 value.
 * Built on first use by zo2.optim.native with the system C compiler (plain C, no torch headers: under a second).
 */
#include <stdint.h>

#define PHILOX_A 0xD2511F53u
#define PHILOX_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u

void zo2_philox4x32_range(int64_t m0, int64_t count, uint32_t k0, uint32_t k1, int64_t *out) {
    for (int64_t i = 0; i < count; ++i) {
        uint64_t m = (uint64_t)(m0 + i);
        uint32_t c0 = (uint32_t)m, c1 = (uint32_t)(m >> 32), c2 = 0, c3 = 0;
        uint32_t a = k0, b = k1;
        for (int r = 0; r < 10; ++r) {
            uint64_t pb = (uint64_t)PHILOX_B * c2;
            uint64_t pa = (uint64_t)PHILOX_A * c0;
            uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ a;
            uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ b;
            c1 = (uint32_t)pb;
            c3 = (uint32_t)pa;
            c0 = n0;
            c2 = n2;
            a += KEY_A;
            b += KEY_B;
        }
        out[i] = c0;
        out[count + i] = c1;
        out[2 * count + i] = c2;
        out[3 * count + i] = c3;
    }
}
