//! The mutation operators: byte-level (bit flips, interesting values at any width and
//! byte order, insertions, deletions, duplications, truncation), splicing two corpus
//! entries, and text-aware (numbers in TOML/JSON/pickle text replaced by extreme ones).

/// splitmix64: small, seedable, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Values that break size arithmetic.
const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0xffff_ffff_ffff_ffff,
    4_000_000_000,
    1_000_000_000_000,
];

/// Numbers a text format may be given.
const TEXT_NUMBERS: [&str; 14] = [
    "0",
    "-1",
    "4000000000",
    "18446744073709551615",
    "18446744073709551616",
    "1e309",
    "-0",
    "nan",
    "2147483648",
    "65536",
    "1000000",
    "3.5",
    "999999999999999999999999",
    "-9223372036854775808",
];

/// One to four stacked mutations of `input`.
pub fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut d = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = d.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = rng.next() as u8;
            }
            2 | 3 if len > 0 => {
                // An interesting value, 1/2/4/8 bytes wide, little or big endian.
                let width = [1, 2, 4, 8][rng.below(4)];
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let bytes = if rng.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let bytes = if rng.below(2) == 0 {
                    &bytes[..width]
                } else {
                    &bytes[8 - width..]
                };
                let at = rng.below(len);
                for (k, &b) in bytes.iter().enumerate() {
                    if at + k < len {
                        d[at + k] = b;
                    }
                }
            }
            4 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(64);
                let extra: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(at..at, extra);
            }
            5 if len > 1 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                d.drain(at..at + n);
            }
            6 if len > 1 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                let chunk = d[at..at + n].to_vec();
                let to = rng.below(len + 1);
                d.splice(to..to, chunk);
            }
            7 if len > 0 => d.truncate(rng.below(len)),
            8 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                d.truncate(cut);
                d.extend_from_slice(&other[from..]);
            }
            9 | 10 => replace_number(rng, &mut d),
            _ => {}
        }
    }
    d
}

/// Replaces one run of ASCII digits by an extreme number.
fn replace_number(rng: &mut Rng, d: &mut Vec<u8>) {
    let runs: Vec<(usize, usize)> = {
        let mut v = Vec::new();
        let mut i = 0;
        while i < d.len() {
            if d[i].is_ascii_digit() {
                let s = i;
                while i < d.len() && d[i].is_ascii_digit() {
                    i += 1;
                }
                v.push((s, i));
            } else {
                i += 1;
            }
        }
        v
    };
    if runs.is_empty() {
        return;
    }
    let (s, e) = runs[rng.below(runs.len())];
    let with = TEXT_NUMBERS[rng.below(TEXT_NUMBERS.len())]
        .as_bytes()
        .to_vec();
    d.splice(s..e, with);
}
