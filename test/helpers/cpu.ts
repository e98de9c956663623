/** A full x86_64 vCPU state in the JSON shape, two vCPUs, with opaque blobs and an unknown key. */
export const sampleCpuState = {
  arch: 'x86_64',
  vcpus: [0, 1].map((id) => ({
    id,
    regs: Object.fromEntries(['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'].map((r, i) => [r, `0x${(i * 0x1111 + id).toString(16).padStart(16, '0')}`])),
    sregs: {
      cs: { selector: '0x10', base: '0x0', limit: '0xffffffff', attrs: '0xa09b' },
      ds: { selector: '0x18', base: '0x0', limit: '0xffffffff' },
      es: { selector: '0x18', base: '0x0', limit: '0xffffffff' },
      fs: { selector: '0x0', base: '0x7f0000001000', limit: '0xffffffff' },
      gs: { selector: '0x0', base: '0xffff888007c00000', limit: '0xffffffff' },
      ss: { selector: '0x18', base: '0x0', limit: '0xffffffff' },
      tr: { selector: '0x40', base: '0xfffffe0000003000', limit: '0x4087' },
      ldt: { selector: '0x0', base: '0x0', limit: '0xffff', attrs: '0x82' },
      gdt: { base: '0xfffffe0000001000', limit: '0x7f' },
      idt: { base: '0xfffffe0000000000', limit: '0xfff' },
      cr0: '0x80050033', cr2: '0x7f1234567000', cr3: '0x10a000', cr4: '0x3706f0', cr8: '0x0', efer: '0xd01', apicBase: '0xfee00900',
    },
    dregs: { dr0: '0x0', dr1: '0x0', dr2: '0x0', dr3: '0x0', dr6: '0xffff0ff0', dr7: '0x400' },
    fpu: { fcw: '0x37f', fsw: '0x0', ftw: '0xffff', mxcsr: '0x1f80', xmm: { xmm00: '0x0000000000000000000000000000ffff', xmm15: '0x1' } },
    msrs: { '0xc0000080': '0xd01', '0xc0000100': '0x7f0000001000' },
    xsave: Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 7 + id) & 0xff)).toString('base64'),
    lapic: Buffer.alloc(1024, 0x5a).toString('base64'),
    hypervisorSpecific: { kvmClock: '0x123', note: 'kept as is' },
  })),
};
