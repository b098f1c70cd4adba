"""CPU emulation of the fragment indexing of csrc/kernels/attention_bwd.cu (no GPU needed).

Replays, lane by lane, the ldmatrix / ldmatrix.trans addresses and mma.m16n8k16 calls of the
dK/dV kernel (S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q, dS^T through shared memory
and dQ += dS K) and of the deterministic dQ kernel (S = Q K^T, dP = dO V^T, dQ += dS K), with the
register layouts the PTX ISA documents (as restated in attention_kernel_utils.cuh), and compares
each product with numpy. Shared-memory padding is filled with NaN, so a read outside the tiles
would show. This checks that the address formulas compose into the right products; it says nothing
about the hardware semantics themselves, timing, or races.

    python scripts/attention_bwd_fragment_emulation.py   # prints max abs errors (~1e-13)
"""
import numpy as np
rng = np.random.default_rng(0)

def ldm(buf, addrs, trans=False):
    # addrs[t] = flat offset of the row lane t supplies; returns regs[lane][m] = (lo, hi)
    regs = [[None]*4 for _ in range(32)]
    for m in range(4):
        mat = np.array([buf[addrs[m*8+r]: addrs[m*8+r]+8] for r in range(8)])
        for t in range(32):
            if not trans:
                regs[t][m] = (mat[t//4, 2*(t%4)], mat[t//4, 2*(t%4)+1])
            else:
                regs[t][m] = (mat[2*(t%4), t//4], mat[2*(t%4)+1, t//4])
    return regs

def mma(d, a, b0, b1):
    # d[lane] = [4 floats], a[lane] = 4 pairs, b0/b1[lane] = pair
    A = np.zeros((16,16)); B = np.zeros((16,8))
    for t in range(32):
        g, c = t//4, 2*(t%4)
        A[g, c:c+2] = a[t][0]; A[g+8, c:c+2] = a[t][1]; A[g, c+8:c+10] = a[t][2]; A[g+8, c+8:c+10] = a[t][3]
        B[c:c+2, g] = b0[t]; B[c+8:c+10, g] = b1[t]
    Dm = np.zeros((16,8))
    for t in range(32):
        g, c = t//4, 2*(t%4)
        Dm[g, c:c+2] = d[t][0:2]; Dm[g+8, c:c+2] = d[t][2:4]
    Dm += A @ B
    for t in range(32):
        g, c = t//4, 2*(t%4)
        d[t] = [Dm[g, c], Dm[g, c+1], Dm[g+8, c], Dm[g+8, c+1]]

def zeros_acc(n): return [[[0.0]*4 for _ in range(32)] for _ in range(n)]

def acc_to_mat(acc, rows=16):
    # acc[nt][lane][e] -> matrix rows x (8*len(acc))
    M = np.zeros((rows, 8*len(acc)))
    for nt in range(len(acc)):
        for t in range(32):
            g, c = t//4, 2*(t%4)
            M[g, nt*8+c:nt*8+c+2] = acc[nt][t][0:2]; M[g+8, nt*8+c:nt*8+c+2] = acc[nt][t][2:4]
    return M

def pack_a(acc, kp):
    return [[(acc[2*kp][t][0], acc[2*kp][t][1]), (acc[2*kp][t][2], acc[2*kp][t][3]),
             (acc[2*kp+1][t][0], acc[2*kp+1][t][1]), (acc[2*kp+1][t][2], acc[2*kp+1][t][3])] for t in range(32)]

def run_dkdv(D, kBlockM, kBlockN=128):
    kStride = D + 8; kSds = kBlockM + 8
    nW = kBlockN // 16
    K = rng.standard_normal((kBlockN, D)); V = rng.standard_normal((kBlockN, D))
    Q = rng.standard_normal((kBlockM, D)); dO = rng.standard_normal((kBlockM, D))
    def smem(M, stride):
        b = np.full(M.shape[0]*stride, np.nan); 
        for r in range(M.shape[0]): b[r*stride:r*stride+M.shape[1]] = M[r]
        return b
    sK, sV, sQ, sdO = smem(K, kStride), smem(V, kStride), smem(Q, kStride), smem(dO, kStride)
    sdS = np.full(kBlockN*kSds, np.nan)
    kMT, kKT, kDT, kMK = kBlockM//8, D//16, D//8, kBlockM//16
    dS_full = np.zeros((kBlockN, kBlockM))
    dK_all = np.zeros((kBlockN, D)); dV_all = np.zeros((kBlockN, D)); ST_all = np.zeros((kBlockN, kBlockM))
    dPT_all = np.zeros((kBlockN, kBlockM))
    accs = []
    for w in range(nW):
        acc_s = zeros_acc(kMT)
        for kk in range(kKT):
            ka = ldm(sK, [(w*16 + (l & 15))*kStride + kk*16 + (l >> 4)*8 for l in range(32)])
            for nt in range(0, kMT, 2):
                qb = ldm(sQ, [(nt*8 + (l & 7) + ((l >> 4) << 3))*kStride + kk*16 + ((l >> 3) & 1)*8 for l in range(32)])
                mma(acc_s[nt], ka, [r[0] for r in qb], [r[1] for r in qb])
                mma(acc_s[nt+1], ka, [r[2] for r in qb], [r[3] for r in qb])
        ST_all[w*16:w*16+16] = acc_to_mat(acc_s)
        # use S^T itself as "P" (values irrelevant to layout checks)
        acc_dv = zeros_acc(kDT)
        for kp in range(kMK):
            pa = pack_a(acc_s, kp)
            for dt in range(0, kDT, 2):
                ob = ldm(sdO, [(kp*16 + (l & 15))*kStride + dt*8 + (l >> 4)*8 for l in range(32)], trans=True)
                mma(acc_dv[dt], pa, [r[0] for r in ob], [r[1] for r in ob])
                mma(acc_dv[dt+1], pa, [r[2] for r in ob], [r[3] for r in ob])
        dV_all[w*16:w*16+16] = acc_to_mat(acc_dv)
        acc_dp = zeros_acc(kMT)
        for kk in range(kKT):
            va = ldm(sV, [(w*16 + (l & 15))*kStride + kk*16 + (l >> 4)*8 for l in range(32)])
            for nt in range(0, kMT, 2):
                ob = ldm(sdO, [(nt*8 + (l & 7) + ((l >> 4) << 3))*kStride + kk*16 + ((l >> 3) & 1)*8 for l in range(32)])
                mma(acc_dp[nt], va, [r[0] for r in ob], [r[1] for r in ob])
                mma(acc_dp[nt+1], va, [r[2] for r in ob], [r[3] for r in ob])
        dPT_all[w*16:w*16+16] = acc_to_mat(acc_dp)
        # treat dP^T as dS^T
        acc_dk = zeros_acc(kDT)
        for kp in range(kMK):
            da = pack_a(acc_dp, kp)
            for dt in range(0, kDT, 2):
                qb = ldm(sQ, [(kp*16 + (l & 15))*kStride + dt*8 + (l >> 4)*8 for l in range(32)], trans=True)
                mma(acc_dk[dt], da, [r[0] for r in qb], [r[1] for r in qb])
                mma(acc_dk[dt+1], da, [r[2] for r in qb], [r[3] for r in qb])
        dK_all[w*16:w*16+16] = acc_to_mat(acc_dk)
        for nt in range(kMT):
            for t in range(32):
                g, cq = t//4, 2*(t%4)
                jl, il = w*16 + g, nt*8 + cq
                sdS[jl*kSds + il: jl*kSds + il + 2] = acc_dp[nt][t][0:2]
                sdS[(jl+8)*kSds + il: (jl+8)*kSds + il + 2] = acc_dp[nt][t][2:4]
    # dQ
    kRT = kBlockM // 16; kCG = nW // kRT; kDC = D // kCG; kNK = kBlockN // 16
    dQ = np.full((kBlockM, D), np.nan)
    for w in range(nW):
        rt, cg = w % kRT, w // kRT
        acc_q = zeros_acc(kDC // 8)
        for kk in range(kNK):
            da = ldm(sdS, [(kk*16 + (l & 7) + ((l >> 4) << 3))*kSds + rt*16 + ((l >> 3) & 1)*8 for l in range(32)], trans=True)
            for dt in range(0, kDC // 8, 2):
                kb = ldm(sK, [(kk*16 + (l & 15))*kStride + cg*kDC + dt*8 + (l >> 4)*8 for l in range(32)], trans=True)
                mma(acc_q[dt], da, [r[0] for r in kb], [r[1] for r in kb])
                mma(acc_q[dt+1], da, [r[2] for r in kb], [r[3] for r in kb])
        dQ[rt*16:rt*16+16, cg*kDC:cg*kDC+kDC] = acc_to_mat(acc_q)
    ST = K @ Q.T; dPT = V @ dO.T
    print(D, kBlockM, 'S^T', np.abs(ST_all - ST).max(), 'dV', np.abs(dV_all - ST @ dO).max(),
          'dP^T', np.abs(dPT_all - dPT).max(), 'dK', np.abs(dK_all - dPT @ Q).max(),
          'dQ', np.abs(dQ - dPT.T @ K).max())

def run_dq(D, kBlockN):
    kStride = D + 8
    Q = rng.standard_normal((16, D)); dO = rng.standard_normal((16, D))
    K = rng.standard_normal((kBlockN, D)); V = rng.standard_normal((kBlockN, D))
    def smem(M):
        b = np.full(M.shape[0]*kStride, np.nan)
        for r in range(M.shape[0]): b[r*kStride:r*kStride+M.shape[1]] = M[r]
        return b
    sQ, sdO, sK, sV = smem(Q), smem(dO), smem(K), smem(V)
    kNT, kKT, kDT, kNK = kBlockN//8, D//16, D//8, kBlockN//16
    acc_s, acc_dp = zeros_acc(kNT), zeros_acc(kNT)
    for kk in range(kKT):
        qa = ldm(sQ, [(l & 15)*kStride + kk*16 + (l >> 4)*8 for l in range(32)])
        oa = ldm(sdO, [(l & 15)*kStride + kk*16 + (l >> 4)*8 for l in range(32)])
        for nt in range(0, kNT, 2):
            offs = [(nt*8 + (l & 7) + ((l >> 4) << 3))*kStride + kk*16 + ((l >> 3) & 1)*8 for l in range(32)]
            kb, vb = ldm(sK, offs), ldm(sV, offs)
            mma(acc_s[nt], qa, [r[0] for r in kb], [r[1] for r in kb]); mma(acc_s[nt+1], qa, [r[2] for r in kb], [r[3] for r in kb])
            mma(acc_dp[nt], oa, [r[0] for r in vb], [r[1] for r in vb]); mma(acc_dp[nt+1], oa, [r[2] for r in vb], [r[3] for r in vb])
    acc_q = zeros_acc(kDT)
    for kp in range(kNK):
        da = pack_a(acc_dp, kp)
        for dt in range(0, kDT, 2):
            kb = ldm(sK, [(kp*16 + (l & 15))*kStride + dt*8 + (l >> 4)*8 for l in range(32)], trans=True)
            mma(acc_q[dt], da, [r[0] for r in kb], [r[1] for r in kb]); mma(acc_q[dt+1], da, [r[2] for r in kb], [r[3] for r in kb])
    print('dq', D, kBlockN, 'S', np.abs(acc_to_mat(acc_s) - Q @ K.T).max(), 'dP', np.abs(acc_to_mat(acc_dp) - dO @ V.T).max(),
          'dQ', np.abs(acc_to_mat(acc_q) - (dO @ V.T) @ K).max())

if __name__ == "__main__":
    run_dkdv(32, 64)
    run_dkdv(96, 64)
    run_dkdv(128, 32)
    run_dq(64, 64)
    run_dq(128, 32)
    run_dq(96, 64)
