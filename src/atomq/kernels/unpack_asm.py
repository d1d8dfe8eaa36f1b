"""PTX for unpacking 4-bit weights in registers, shared by the Triton and Gluon GEMM kernels.

The two-output forms take one 32-bit register of 4 packed bytes ($2) and write two registers ($0: the 4
low nibbles, $1: the 4 high nibbles), every nibble a two's-complement INT4 value. The one-half form
(``unpack_int8_half_asm``) takes the packed bytes as $1 and writes one of the two.
"""

# int8 out. Per byte: n ^ 8 = v + 8 in 0..15; + 0x78 then ^ 0x80 gives v as a signed byte, no carries.
UNPACK_INT8_ASM = """{
.reg .b32 t, m, e, a, f;
mov.b32 m, 0x0f0f0f0f;
mov.b32 e, 0x08080808;
mov.b32 a, 0x78787878;
mov.b32 f, 0x80808080;
lop3.b32 t, $2, m, e, 0x6a;
add.u32 t, t, a;
xor.b32 $0, t, f;
shr.u32 t, $2, 4;
lop3.b32 t, t, m, e, 0x6a;
add.u32 t, t, a;
xor.b32 $1, t, f;
}
"""

# int8 out, each nibble times its group's multiplier m (1..15; 0 for padding). Args: $2 the packed bytes;
# for the low nibbles $3 = m in every byte and $4 = 128 - 8m in every byte, for the high ones $5 and $6
# (``shared``: the high nibbles take $3 and $4 too, one multiplier for a K block inside one group).
# Per byte: n = v + 8 in 0..15, then n * m + 128 - 8m stays in 8..233 (no carries between bytes), and
# ^ 0x80 gives v * m as a signed byte.
def _unpack_int8_mult_asm(shared: bool) -> str:
    high_m, high_c = ("", "$4") if shared else ("and.b32 u, $5, 0xff;\n", "$6")
    return f"""{{
.reg .b32 t, u, m, e, f;
mov.b32 m, 0x0f0f0f0f;
mov.b32 e, 0x08080808;
mov.b32 f, 0x80808080;
and.b32 u, $3, 0xff;
lop3.b32 t, $2, m, e, 0x6a;
mad.lo.u32 t, t, u, $4;
xor.b32 $0, t, f;
{high_m}shr.u32 t, $2, 4;
lop3.b32 t, t, m, e, 0x6a;
mad.lo.u32 t, t, u, {high_c};
xor.b32 $1, t, f;
}}
"""


UNPACK_INT8_MULT_ASM = _unpack_int8_mult_asm(shared=False)
UNPACK_INT8_MULT1_ASM = _unpack_int8_mult_asm(shared=True)


# One half only (a kernel that rewrites the low and the high registers at different times): $0 = the 4 nibbles
# at bit ``shift`` (0: low, 4: high) of the packed bytes $1, as UNPACK_INT8_ASM's; with ``mult``, times the
# row's multiplier m, as the multiplier forms'. Unlike theirs, $2 is m itself as a plain 32-bit value (not m
# in every byte: it multiplies the whole word, each byte n * m <= 225 so nothing carries) and $6 is
# 128 - 8m in every byte; the caller passes 4 copies of each ($2..$5, $6..$9), one per int8 of the pack.
def unpack_int8_half_asm(shift: int, mult: bool = False) -> str:
    src = f"shr.u32 t, $1, {shift};\nlop3.b32 t, t, m, e, 0x6a;" if shift else "lop3.b32 t, $1, m, e, 0x6a;"
    scale = "mad.lo.u32 t, t, $2, $6;" if mult else "add.u32 t, t, 0x78787878;"
    return f"""{{
.reg .b32 t, m, e;
mov.b32 m, 0x0f0f0f0f;
mov.b32 e, 0x08080808;
{src}
{scale}
xor.b32 $0, t, 0x80808080;
}}
"""


# float8_e4m3fn out: the nibble (offset by 8) goes into the mantissa of fp16 1024 (prmt), minus 1032
# gives v exactly in fp16, then a saturating convert to e4m3 (exact for -8..7).
UNPACK_FP8_ASM = """{
.reg .b32 x, t, u, v, c, k;
.reg .b16 a0, a1;
mov.b32 c, 0x64086408;
mov.b32 k, 0x64646464;
xor.b32 x, $2, 0x88888888;
and.b32 t, x, 0x0f0f0f0f;
prmt.b32 u, t, k, 0x4140;
prmt.b32 v, t, k, 0x4342;
sub.f16x2 u, u, c;
sub.f16x2 v, v, c;
cvt.rn.satfinite.e4m3x2.f16x2 a0, u;
cvt.rn.satfinite.e4m3x2.f16x2 a1, v;
mov.b32 $0, {a0, a1};
shr.u32 t, x, 4;
and.b32 t, t, 0x0f0f0f0f;
prmt.b32 u, t, k, 0x4140;
prmt.b32 v, t, k, 0x4342;
sub.f16x2 u, u, c;
sub.f16x2 v, v, c;
cvt.rn.satfinite.e4m3x2.f16x2 a0, u;
cvt.rn.satfinite.e4m3x2.f16x2 a1, v;
mov.b32 $1, {a0, a1};
}
"""
