// fiber.cpp: the harness's context switch. An emulated block switches once per thread at every
// barrier and warp collective, so the switch saves only what the ABI says a callee keeps
// (callee-saved registers and the floating-point control words) instead of glibc's swapcontext,
// whose signal-mask system call made each switch about 20x slower.
#include <cstring>

#include "internal.h"

extern "C" {
void txemu_switch_context(txemu::Context* from, txemu::Context* to);
void txemu_fiber_start();
}

#if defined(__x86_64__)
// Stack of a suspended context, from its saved sp upward: mxcsr + x87 control word (8 bytes),
// r15, r14, r13, r12, rbx, rbp, return address.
asm(R"(
  .text
  .globl txemu_switch_context
  .hidden txemu_switch_context
  .type txemu_switch_context, @function
txemu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq (%rsi), %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size txemu_switch_context, .-txemu_switch_context

  .globl txemu_fiber_start
  .hidden txemu_fiber_start
  .type txemu_fiber_start, @function
txemu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size txemu_fiber_start, .-txemu_fiber_start
)");

namespace txemu {
void make_context(Context* ctx, char* stack, size_t bytes, void (*entry)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top - 64);
  uint32_t csr[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  std::memcpy(&slot[0], csr, 8);
  slot[1] = 0;                                    // r15
  slot[2] = 0;                                    // r14
  slot[3] = reinterpret_cast<uint64_t>(entry);    // r13
  slot[4] = reinterpret_cast<uint64_t>(arg);      // r12
  slot[5] = 0;                                    // rbx
  slot[6] = 0;                                    // rbp
  slot[7] = reinterpret_cast<uint64_t>(&txemu_fiber_start);  // return address, at top - 8
  ctx->sp = slot;
}
}  // namespace txemu

#elif defined(__aarch64__)
// Saved frame (176 bytes): x19..x30 at 0..95, d8..d15 at 96..159, fpcr at 160.
asm(R"(
  .text
  .globl txemu_switch_context
  .hidden txemu_switch_context
  .type txemu_switch_context, %function
txemu_switch_context:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mrs x9, fpcr
  str x9, [sp, #160]
  mov x9, sp
  str x9, [x0]
  ldr x9, [x1]
  mov sp, x9
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  ldr x9, [sp, #160]
  msr fpcr, x9
  add sp, sp, #176
  ret
  .size txemu_switch_context, .-txemu_switch_context

  .globl txemu_fiber_start
  .hidden txemu_fiber_start
  .type txemu_fiber_start, %function
txemu_fiber_start:
  mov x0, x19
  blr x20
  brk #0
  .size txemu_fiber_start, .-txemu_fiber_start
)");

namespace txemu {
void make_context(Context* ctx, char* stack, size_t bytes, void (*entry)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top - 176);
  std::memset(slot, 0, 176);
  slot[0] = reinterpret_cast<uint64_t>(arg);     // x19
  slot[1] = reinterpret_cast<uint64_t>(entry);   // x20
  slot[11] = reinterpret_cast<uint64_t>(&txemu_fiber_start);  // x30
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  slot[20] = fpcr;
  ctx->sp = slot;
}
}  // namespace txemu

#else
#error "the CUDA emulator's context switch supports x86-64 and AArch64"
#endif

namespace txemu {
void switch_context(Context* from, Context* to) { txemu_switch_context(from, to); }
}  // namespace txemu
