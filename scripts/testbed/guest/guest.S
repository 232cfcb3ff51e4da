# ferry test guest: a BIOS-booted bare-metal loop that dirties RAM at a known rate.
#
# Built by scripts/testbed/guestimage.py (as --32, ld -T guest.ld, objcopy -O binary);
# the Python builder patches the parameter block at the start of stage 2.
#
#   0x00000-0x004ff  IVT + BIOS data area (left alone)
#   0x01000-0x0117f  IDT (48 gates) built at run time
#   ...    -0x07bff  stack (real mode and protected mode)
#   0x07c00-0x07dff  MBR: loads stage 2 with int 13h (LBA, else CHS)
#   0x07e00-...      stage 2: parameter block, E820, A20, protected mode, main loop
#   0x200000-        random region (random_mib), then text region (text_mib: each
#                    page 5/8 hex text, 3/8 zero, about 3:1 under zstd), then dirty
#                    region (dirty_mib) also starting at 2 MiB, so dirtying overwrites
#                    random pages; all clamped to the usable RAM from E820 and to
#                    0xc0000000.
#
# With a disk log (log_sectors > 0 in the FERRYDSK block), every counter line is
# first written to the disk (IDE primary master, ATA PIO, polled): a record sector
# for counter N at LBA 2049 + N mod log_sectors and a head sector at LBA 2048,
# both rewritten in place; the line goes to COM1 only once the device completed
# both writes.  A record: "FERRYLOG" (head: "FERRYHED"), N, ~N, words 4..126 =
# N * 0x9e3779b1 + i, word 127 = the xor of words 0..126.
#
# Time comes from polling PIT channel 0 (mode 2, period 65536 ticks of
# 1.193182 MHz, read with the latch command, wraparounds counted in a 64-bit
# tick count).  When there is nothing to do the CPU halts until the next RTC
# periodic interrupt (64 Hz), so an idle guest does not spin a host CPU.
#
# Boot identifier: 64 bits taken once per boot (the TSC at start, xor two RDRAND
# words on bare metal where CPUID offers RDRAND), printed with the banner and every counter line.
# It lives in RAM, so a migrated or restored guest keeps it and a rebooted one
# (the image loaded afresh) gets a new one.

        .set    COM1, 0x3f8
        .set    IDT_BASE, 0x1000
        .set    REGION_START, 0x200000
        .set    RAM_CEILING, 0xc0000000
        .set    RATE_MAX, 0xffffffff
        .set    BATCH, 256              # pages dirtied between two timer polls
        .set    ATA, 0x1f0              # IDE primary channel (hda)
        .set    ATA_CTL, 0x3f6
        .set    LOG_LBA, 2048           # head sector; records from LOG_LBA + 1
        .set    SECBUF, 0x1400          # one sector, below the stack
        .set    TEXT_BYTES, 2560        # text at the start of each text page, then zeros

        .text
        .code16
        .globl  _start
_start:
        ljmp    $0, $boot
boot:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7c00, %sp
        cld
        sti
        mov     %dl, boot_drive
        mov     $0x41, %ah              # int 13h extensions present?
        mov     $0x55aa, %bx
        int     $0x13
        jc      chs_read
        cmp     $0xaa55, %bx
        jne     chs_read
        test    $1, %cl
        jz      chs_read
        mov     $dap, %si
        mov     $0x42, %ah
        mov     boot_drive, %dl
        int     $0x13
        jnc     stage2
chs_read:
        xor     %ax, %ax
        mov     %ax, %es
        mov     $0x7e00, %bx
        mov     $_stage2_sectors, %ax
        mov     $0x02, %ah
        mov     $0x0002, %cx            # cylinder 0, sector 2
        xor     %dh, %dh                # head 0
        mov     boot_drive, %dl
        int     $0x13
        jnc     stage2
        mov     $msg_disk, %si
print16:                                # print %si to COM1, then stop
        lodsb
        test    %al, %al
        jz      halt16
        mov     %al, %bl
        mov     $COM1+5, %dx
1:      in      %dx, %al
        test    $0x20, %al
        jz      1b
        mov     $COM1, %dx
        mov     %bl, %al
        out     %al, %dx
        jmp     print16
halt16:
        cli
        hlt
        jmp     halt16

        .balign 4
dap:    .byte   16, 0
        .word   _stage2_sectors
        .word   0x7e00, 0               # buffer offset, segment
        .quad   1                       # first LBA
boot_drive:
        .byte   0
msg_disk:
        .asciz  "ferry-guest disk error\r\n"
        .org    510
        .word   0xaa55

# ---- stage 2 (0x7e00) -------------------------------------------------------
# Parameter block: found by its magic and rewritten by scripts/testbed/guestimage.py.
params:
        .ascii  "FERRYPRM"
p_version:      .long 2
p_dirty_mib:    .long 0
p_rate:         .long 0                 # MiB/s; 0 = none; 0xffffffff = max
p_random_mib:   .long 0
p_interval_ms:  .long 100
p_interval_ticks: .long 119318          # PIT ticks between counter lines
p_tpp_int:      .long 0                 # PIT ticks per dirtied page, 32.32 fixed
p_tpp_frac:     .long 0
p_text_mib:     .long 0
diskparams:                             # second block, also patched by the builder
        .ascii  "FERRYDSK"
d_version:      .long 1
d_log_sectors:  .long 0                 # 0: no disk log

stage2:
        # Top of the usable RAM that contains 1 MiB, from E820.
        xor     %ebx, %ebx
e820_next:
        mov     $0xe820, %eax
        mov     $0x534d4150, %edx       # 'SMAP'
        mov     $24, %ecx
        mov     $e820_buf, %di
        movl    $1, e820_buf+20
        int     $0x15
        jc      e820_done
        cmp     $0x534d4150, %eax
        jne     e820_done
        cmpl    $1, e820_buf+16         # usable RAM
        jne     e820_skip
        cmpl    $0, e820_buf+4          # starts below 4 GiB
        jne     e820_skip
        mov     e820_buf, %eax
        cmp     $0x100000, %eax
        ja      e820_skip
        add     e820_buf+8, %eax        # end = base + length (64-bit)
        mov     e820_buf+12, %edx
        adc     $0, %edx
        jz      1f
        mov     $RAM_CEILING, %eax      # ends above 4 GiB
1:      cmp     $0x100000, %eax
        jbe     e820_skip
        mov     %eax, mem_top
e820_skip:
        test    %ebx, %ebx
        jnz     e820_next
e820_done:
        cmpl    $0, mem_top
        jne     have_mem
        # No E820: CMOS 0x34/0x35 (64 KiB above 16 MiB) else 0x30/0x31 (KiB above
        # 1 MiB); keep 1 MiB clear for BIOS tables at the top.
        mov     $0x35, %al
        out     %al, $0x70
        in      $0x71, %al
        mov     %al, %ah
        mov     $0x34, %al
        out     %al, $0x70
        in      $0x71, %al
        movzwl  %ax, %eax
        shl     $16, %eax
        jz      2f
        add     $0x1000000-0x100000, %eax
        jmp     3f
2:      mov     $0x31, %al
        out     %al, $0x70
        in      $0x71, %al
        mov     %al, %ah
        mov     $0x30, %al
        out     %al, $0x70
        in      $0x71, %al
        movzwl  %ax, %eax
        shl     $10, %eax
3:      mov     %eax, mem_top
have_mem:
        # A20 through the BIOS and port 0x92 (never set bit 0: that resets).
        mov     $0x2401, %ax
        int     $0x15
        in      $0x92, %al
        or      $0x02, %al
        and     $0xfe, %al
        out     %al, $0x92
        cli
        lgdt    gdt_desc
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $pm32

        .balign 8
gdt:    .quad   0
        .quad   0x00cf9a000000ffff      # 0x08: flat 32-bit code
        .quad   0x00cf92000000ffff      # 0x10: flat 32-bit data
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt
idt_desc:
        .word   48*8 - 1
        .long   IDT_BASE

# ---- protected mode -----------------------------------------------------------
        .code32
pm32:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        mov     $0x7c00, %esp
        mov     $0xff, %al              # mask the BIOS's IRQs (PIT at 18.2 Hz) until
        out     %al, $0x21              # setup_timers: nothing may interrupt us
        out     %al, $0xa1
        call    serial_init
        call    setup_idt
        call    make_boot_id
        call    layout
        call    banner
        call    fill_random
        call    fill_text
        call    filled
        call    setup_timers            # after the fill: a pending IRQ slows TCG
        mov     $0x02, %al              # ATA: no interrupts (nIEN), we poll
        mov     $ATA_CTL, %dx
        out     %al, %dx
        jmp     main_loop

make_boot_id:                           # boot_hi:boot_lo, new on every boot
        rdtsc
        mov     %eax, boot_lo
        mov     %edx, boot_hi
        mov     $1, %eax                # RDRAND only on a CPU without a hypervisor:
        cpuid                           # a KVM that emulates this non-paged code (PVM)
        bt      $31, %ecx               # cannot emulate RDRAND ("KVM internal error")
        jc      9f                      # CPUID.1:ECX.hypervisor
        bt      $30, %ecx               # CPUID.1:ECX.RDRAND
        jnc     9f
        call    rdrand32
        xor     %eax, boot_lo
        call    rdrand32
        xor     %eax, boot_hi
9:      ret
rdrand32:                               # %eax = a random word (0 if RDRAND keeps failing)
        mov     $10, %ecx
1:      rdrand  %eax
        jc      2f
        loop    1b
        xor     %eax, %eax
2:      ret

serial_init:                            # 115200 8N1, FIFO, no interrupts
        mov     $COM1+1, %dx
        xor     %al, %al
        out     %al, %dx
        mov     $COM1+3, %dx
        mov     $0x80, %al
        out     %al, %dx
        mov     $COM1, %dx
        mov     $1, %al
        out     %al, %dx
        mov     $COM1+1, %dx
        xor     %al, %al
        out     %al, %dx
        mov     $COM1+3, %dx
        mov     $0x03, %al
        out     %al, %dx
        mov     $COM1+2, %dx
        mov     $0xc7, %al
        out     %al, %dx
        mov     $COM1+4, %dx
        mov     $0x03, %al
        out     %al, %dx
        ret

setup_idt:                              # 0-31 fault stubs, 32-47 PIC IRQs
        mov     $IDT_BASE, %edi
        mov     $fault_stubs, %edx
        mov     $32, %ecx
1:      call    set_gate
        add     $16, %edx
        loop    1b
        mov     $irq_handler, %edx
        mov     $16, %ecx
2:      call    set_gate
        loop    2b
        lidt    idt_desc
        ret
set_gate:                               # gate at %edi -> handler %edx; %edi += 8
        mov     %dx, (%edi)
        movw    $0x08, 2(%edi)
        movw    $0x8e00, 4(%edi)
        mov     %edx, %eax
        shr     $16, %eax
        mov     %ax, 6(%edi)
        add     $8, %edi
        ret

setup_timers:
        # PICs at vectors 0x20/0x28; only IRQ2 (cascade) and IRQ8 (RTC) unmasked.
        mov     $0x11, %al
        out     %al, $0x20
        out     %al, $0xa0
        mov     $0x20, %al
        out     %al, $0x21
        mov     $0x28, %al
        out     %al, $0xa1
        mov     $0x04, %al
        out     %al, $0x21
        mov     $0x02, %al
        out     %al, $0xa1
        mov     $0x01, %al
        out     %al, $0x21
        out     %al, $0xa1
        mov     $0xfb, %al
        out     %al, $0x21
        mov     $0xfe, %al
        out     %al, $0xa1
        # RTC periodic interrupt at 64 Hz (rate 10): only a wake-up source for hlt,
        # often enough to count every PIT wrap (55 ms); at 1024 Hz an idle TCG
        # guest cost its host ~10% of a CPU, at 64 Hz ~1%.
        mov     $0x8a, %al
        out     %al, $0x70
        in      $0x71, %al
        and     $0x70, %al
        or      $0x0a, %al
        mov     %al, %ah
        mov     $0x8a, %al
        out     %al, $0x70
        mov     %ah, %al
        out     %al, $0x71
        mov     $0x8b, %al
        out     %al, $0x70
        in      $0x71, %al
        or      $0x40, %al
        mov     %al, %ah
        mov     $0x8b, %al
        out     %al, $0x70
        mov     %ah, %al
        out     %al, $0x71
        mov     $0x0c, %al
        out     %al, $0x70
        in      $0x71, %al
        # PIT channel 0: mode 2, lobyte/hibyte, reload 0 = 65536 ticks.
        mov     $0x34, %al
        out     %al, $0x43
        xor     %al, %al
        out     %al, $0x40
        out     %al, $0x40
        call    pit_read
        mov     %ecx, pit_last
        ret

pit_read:                               # %ecx = latched channel 0 count
        xor     %eax, %eax
        out     %al, $0x43
        in      $0x40, %al
        mov     %al, %cl
        in      $0x40, %al
        mov     %al, %ch
        movzwl  %cx, %ecx
        ret

pit_poll:                               # now += ticks since the last poll (< 65536)
        call    pit_read
        mov     pit_last, %eax
        sub     %ecx, %eax
        movzwl  %ax, %eax
        mov     %ecx, pit_last
        add     %eax, now_lo
        adcl    $0, now_hi
        ret

layout:                                 # clamp regions to [2 MiB, min(RAM top, 3 GiB))
        mov     mem_top, %eax
        cmp     $RAM_CEILING, %eax
        jbe     1f
        mov     $RAM_CEILING, %eax
1:      and     $0xfffff000, %eax
        mov     %eax, mem_top
        sub     $REGION_START, %eax
        jae     2f
        xor     %eax, %eax
2:      mov     %eax, %ebx              # bytes available above 2 MiB
        mov     p_dirty_mib, %eax
        call    mib_clamp
        mov     %eax, dirty_bytes
        add     $REGION_START, %eax
        mov     %eax, dirty_end
        mov     p_random_mib, %eax
        call    mib_clamp
        add     $REGION_START, %eax
        mov     %eax, random_end
        sub     $REGION_START, %eax     # text goes in what the random region left
        sub     %eax, %ebx
        mov     p_text_mib, %eax
        call    mib_clamp
        add     random_end, %eax
        mov     %eax, text_end
        ret
mib_clamp:                              # %eax MiB -> bytes, at most %ebx
        cmp     $4095, %eax
        jbe     1f
        mov     $4095, %eax
1:      shl     $20, %eax
        cmp     %ebx, %eax
        jbe     2f
        mov     %ebx, %eax
2:      ret

banner:
        mov     $msg_ready, %esi
        call    puts
        mov     mem_top, %eax
        shr     $20, %eax
        call    putdec
        mov     $msg_dirty, %esi
        call    puts
        mov     dirty_bytes, %eax
        shr     $20, %eax
        call    putdec
        mov     $msg_rate, %esi
        call    puts
        mov     p_rate, %eax
        cmp     $RATE_MAX, %eax
        je      1f
        call    putdec
        jmp     2f
1:      mov     $msg_max, %esi
        call    puts
2:      call    put_boot
        mov     $msg_crlf, %esi
        jmp     puts

fill_random:                            # xorshift32 over [2 MiB, random_end)
        cmpl    $0, p_random_mib
        je      9f
        mov     random_end, %ecx
        mov     $REGION_START, %edi
        mov     $0x2545f491, %eax
        cmp     %ecx, %edi
        jae     2f
1:      mov     %eax, %edx
        shl     $13, %edx
        xor     %edx, %eax
        mov     %eax, %edx
        shr     $17, %edx
        xor     %edx, %eax
        mov     %eax, %edx
        shl     $5, %edx
        xor     %edx, %eax
        stosl
        cmp     %ecx, %edi
        jb      1b
2:
9:      ret

fill_text:                              # hex text over [random_end, text_end), per page
        cmpl    $0, p_text_mib          # TEXT_BYTES of it and the rest left zero
        je      9f
        mov     random_end, %edi
        mov     $0x9e3779b9, %ebp       # its own xorshift32 state
1:      cmp     text_end, %edi
        jae     9f
        lea     TEXT_BYTES(%edi), %esi
2:      mov     %ebp, %eax
        shl     $13, %eax
        xor     %eax, %ebp
        mov     %ebp, %eax
        shr     $17, %eax
        xor     %eax, %ebp
        mov     %ebp, %eax
        shl     $5, %eax
        xor     %eax, %ebp
        mov     %ebp, %edx
        mov     $8, %ecx                # eight hex digits per 32 random bits
3:      mov     %edx, %eax
        and     $15, %eax
        movb    hexdigits(%eax), %al
        stosb
        shr     $4, %edx
        loop    3b
        cmp     %esi, %edi
        jb      2b
        add     $(4096 - TEXT_BYTES), %edi
        jmp     1b
9:      ret

filled:                                 # "filled" once a fill region was asked for
        mov     p_random_mib, %eax
        or      p_text_mib, %eax
        jz      9f
        mov     $msg_filled, %esi
        call    puts
9:      ret

main_loop:
        call    pit_poll
        mov     now_lo, %eax
        mov     now_hi, %edx
        mov     %eax, due_lo            # first pages are due right away
        mov     %edx, due_hi
        add     p_interval_ticks, %eax
        adc     $0, %edx
        mov     %eax, line_lo
        mov     %edx, line_hi
loop_top:
        call    pit_poll
        call    maybe_line
        cmpl    $0, dirty_bytes
        je      idle
        mov     p_rate, %eax
        test    %eax, %eax
        je      idle
        cmp     $RATE_MAX, %eax
        je      flat_out
        mov     $BATCH, %esi
rate_next:                              # dirty every page whose due time has come
        mov     now_lo, %eax
        mov     now_hi, %edx
        sub     due_lo, %eax
        sbb     due_hi, %edx
        jc      idle                    # now < due: wait
        test    %esi, %esi
        jz      behind
        call    dirty_one
        mov     p_tpp_frac, %eax
        add     %eax, due_frac
        mov     p_tpp_int, %eax
        adc     %eax, due_lo
        adcl    $0, due_hi
        dec     %esi
        jmp     rate_next
behind:                                 # %edx:%eax = now - due; owe at most 65536 ticks
        test    %edx, %edx
        jnz     1f
        cmp     $65536, %eax
        jbe     loop_top
1:      mov     now_lo, %eax
        mov     now_hi, %edx
        sub     $65536, %eax
        sbb     $0, %edx
        mov     %eax, due_lo
        mov     %edx, due_hi
        jmp     loop_top
flat_out:
        mov     $BATCH, %esi
1:      call    dirty_one
        dec     %esi
        jnz     1b
        jmp     loop_top
idle:                                   # sleep until the next RTC tick (< 16 ms)
        sti
        hlt
        cli
        jmp     loop_top

maybe_line:                             # "ferry-guest <N> boot=<id>\r\n" every interval
        mov     now_lo, %eax
        mov     now_hi, %edx
        sub     line_lo, %eax
        sbb     line_hi, %edx
        jc      9f
        call    disk_log
        mov     $msg_prefix, %esi
        call    puts
        mov     counter, %eax
        call    putdec
        call    put_boot
        mov     $msg_crlf, %esi
        call    puts
        incl    counter
        mov     p_interval_ticks, %eax
        add     %eax, line_lo
        adcl    $0, line_hi
        mov     now_lo, %eax            # still behind (guest was paused): no burst
        mov     now_hi, %edx
        sub     line_lo, %eax
        sbb     line_hi, %edx
        jc      9f
        mov     now_lo, %eax
        mov     now_hi, %edx
        add     p_interval_ticks, %eax
        adc     $0, %edx
        mov     %eax, line_lo
        mov     %edx, line_hi
9:      ret

dirty_one:                              # one changing 32-bit write to the next page
        mov     dirty_ptr, %edi
        mov     seq, %eax
        mov     %eax, (%edi)
        inc     %eax
        mov     %eax, seq
        add     $4096, %edi
        cmp     dirty_end, %edi
        jb      1f
        mov     $REGION_START, %edi
1:      mov     %edi, dirty_ptr
        ret

disk_log:                               # counter's record, then the head, on disk
        cmpl    $0, d_log_sectors
        je      9f
        cmpb    $0, disk_broken
        jne     9f
        mov     counter, %eax
        mov     $log_magic, %ebx
        call    make_record
        mov     counter, %eax
        xor     %edx, %edx
        divl    d_log_sectors
        lea     LOG_LBA+1(%edx), %eax
        call    ata_write
        jc      8f
        mov     counter, %eax
        mov     $head_magic, %ebx
        call    make_record
        mov     $LOG_LBA, %eax
        call    ata_write
        jnc     9f
8:      movb    $1, disk_broken         # report once, then stop logging
        mov     $msg_disk_error, %esi
        call    puts
9:      ret

make_record:                            # SECBUF = record of counter %eax, magic at %ebx
        push    %ecx
        push    %edx
        push    %esi
        push    %edi
        mov     $SECBUF, %edi
        mov     (%ebx), %edx
        mov     %edx, (%edi)
        mov     4(%ebx), %edx
        mov     %edx, 4(%edi)
        mov     %eax, 8(%edi)
        mov     %eax, %edx
        not     %edx
        mov     %edx, 12(%edi)
        imul    $0x9e3779b1, %eax, %edx
        mov     $4, %ecx
1:      lea     (%edx,%ecx), %esi
        mov     %esi, (%edi,%ecx,4)
        inc     %ecx
        cmp     $127, %ecx
        jb      1b
        xor     %edx, %edx
        xor     %ecx, %ecx
2:      xor     (%edi,%ecx,4), %edx
        inc     %ecx
        cmp     $127, %ecx
        jb      2b
        mov     %edx, 508(%edi)
        pop     %edi
        pop     %esi
        pop     %edx
        pop     %ecx
        ret

ata_ready:                              # wait until BSY clears; status in %al
        mov     $ATA+7, %dx
1:      in      %dx, %al
        test    $0x80, %al
        jnz     1b
        ret

ata_write:                              # SECBUF to LBA %eax (LBA28); CF on error
        push    %ebx
        push    %ecx
        push    %edx
        push    %esi
        mov     %eax, %ebx
        call    ata_ready
        mov     $ATA+6, %dx
        mov     %ebx, %eax
        shr     $24, %eax
        and     $0x0f, %al
        or      $0xe0, %al              # LBA, master
        out     %al, %dx
        mov     $ATA+2, %dx
        mov     $1, %al                 # one sector
        out     %al, %dx
        inc     %dx
        mov     %bl, %al
        out     %al, %dx
        inc     %dx
        mov     %bh, %al
        out     %al, %dx
        inc     %dx
        mov     %ebx, %eax
        shr     $16, %eax
        out     %al, %dx
        mov     $ATA+7, %dx
        mov     $0x30, %al              # WRITE SECTORS
        out     %al, %dx
        call    ata_ready
        test    $0x01, %al              # ERR
        jnz     8f
        test    $0x08, %al              # DRQ: the device takes the data
        jz      8f
        mov     $SECBUF, %esi
        mov     $256, %ecx
        mov     $ATA, %dx
        rep outsw
        call    ata_ready               # BSY until the write completed
        test    $0x21, %al              # ERR or DF
        jnz     8f
        clc
        jmp     9f
8:      stc
9:      pop     %esi
        pop     %edx
        pop     %ecx
        pop     %ebx
        ret

putc:                                   # %al to COM1, polling LSR.THRE
        push    %edx
        push    %eax
        mov     $COM1+5, %dx
1:      in      %dx, %al
        test    $0x20, %al
        jz      1b
        pop     %eax
        mov     $COM1, %dx
        out     %al, %dx
        pop     %edx
        ret
puts:                                   # NUL-terminated string at %esi
        push    %eax
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc
        jmp     1b
2:      pop     %eax
        ret
putdec:                                 # %eax in decimal
        push    %ebx
        push    %ecx
        push    %edx
        mov     $10, %ebx
        xor     %ecx, %ecx
1:      xor     %edx, %edx
        div     %ebx
        push    %edx
        inc     %ecx
        test    %eax, %eax
        jnz     1b
2:      pop     %eax
        add     $'0', %al
        call    putc
        loop    2b
        pop     %edx
        pop     %ecx
        pop     %ebx
        ret

put_boot:                               # " boot=" and the boot id in 16 hex digits
        push    %eax
        mov     $msg_boot, %esi
        call    puts
        mov     boot_hi, %eax
        call    puthex
        mov     boot_lo, %eax
        call    puthex
        pop     %eax
        ret
puthex:                                 # %eax as 8 lowercase hex digits
        push    %ecx
        push    %edx
        mov     %eax, %edx
        mov     $8, %ecx
1:      rol     $4, %edx
        mov     %dl, %al
        and     $0x0f, %al
        add     $'0', %al
        cmp     $'9', %al
        jbe     2f
        add     $'a'-'9'-1, %al
2:      call    putc
        loop    1b
        pop     %edx
        pop     %ecx
        ret

irq_handler:                            # ack the RTC, EOI both PICs
        # IF is set only around the hlt in `idle`, so this always interrupts that
        # hlt: drop the frame and go round the loop instead of iret.  (KVM's
        # instruction emulator cannot do a protected-mode iret, and some hosts,
        # e.g. PVM, emulate it: "KVM internal error. Suberror: 1".)
        mov     $0x0c, %al
        out     %al, $0x70
        in      $0x71, %al
        mov     $0x20, %al
        out     %al, $0xa0
        out     %al, $0x20
        add     $12, %esp
        jmp     loop_top

        .balign 16
fault_stubs:                            # 16 bytes each: push vector, report it, stop
        .set    vec, 0
        .rept   32
        .balign 16
        push    $vec
        jmp     fault
        .set    vec, vec + 1
        .endr
fault:
        mov     $msg_fault, %esi
        call    puts
        pop     %eax
        call    putdec
        mov     $msg_crlf, %esi
        call    puts
1:      cli
        hlt
        jmp     1b

msg_ready:  .asciz "ferry-guest ready ram_mib="
msg_dirty:  .asciz " dirty_mib="
msg_rate:   .asciz " rate="
msg_max:    .asciz "max"
msg_crlf:   .asciz "\r\n"
msg_filled: .asciz "ferry-guest filled\r\n"
hexdigits:  .ascii "0123456789abcdef"
msg_prefix: .asciz "ferry-guest "
msg_boot:   .asciz " boot="
msg_fault:  .asciz "ferry-guest fault vector="
msg_disk_error: .asciz "ferry-guest disk-error\r\n"
log_magic:  .ascii "FERRYLOG"
head_magic: .ascii "FERRYHED"
disk_broken: .byte 0

        .balign 4
mem_top:    .long 0
dirty_bytes: .long 0
dirty_end:  .long 0
random_end: .long 0
text_end:   .long 0
dirty_ptr:  .long REGION_START
seq:        .long 1
counter:    .long 1
boot_lo:    .long 0
boot_hi:    .long 0
pit_last:   .long 0
now_lo:     .long 0
now_hi:     .long 0
due_frac:   .long 0
due_lo:     .long 0
due_hi:     .long 0
line_lo:    .long 0
line_hi:    .long 0
e820_buf:   .fill 24, 1, 0
