//! Audio input: WAV files of every supported sample format read back as written; the mel
//! spectrogram, its filter bank and the log-mel features against torchaudio
//! (`tools/fixtures/audio.py`); folders of clips into feature sets; and clear errors for bad
//! files and folders.
//!
//! Tolerances (the measured worst case is printed with `--nocapture`):
//! - mel power: `|got - want| <= 1e-5 * max|want|` of the case, against torchaudio both in
//!   float64 and with its float32 defaults (convnet computes in f64 and rounds to f32);
//! - filter bank: absolute 1e-6 (values in [0, 1]);
//! - log-mel in dB: absolute 1e-3 dB against the float64 reference. dB is a log scale, so
//!   an absolute bound is the relative bound of the power (1e-3 dB = 2.3e-4 relative); it
//!   holds for quiet bins too, down to the -100 dB floor, because both sides compute the
//!   power in float64. The float32 torchaudio dB is not compared: its quietest bins carry
//!   float32 rounding of the loudest (1e-7 of the maximum), tens of dB off.

mod common;

use common::scratch::Scratch;

use common::{assert_close, Fixture};
use convnet::data::audio::{
    read_folder, read_wav, wav_from_bytes, AudioFeatures, AudioOptions, MelSpectrogram,
};
use hound::{SampleFormat, WavSpec, WavWriter};
use std::path::Path;

/// A fresh temporary folder for one test.
fn scratch(name: &str) -> Scratch {
    Scratch::folder(&format!("audio-{name}"))
}

fn spec(channels: u16, rate: u32, bits: u16, format: SampleFormat) -> WavSpec {
    WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: format,
    }
}

/// Writes 16-bit mono samples.
fn write_i16(path: &Path, rate: u32, samples: &[i16]) {
    let mut w = WavWriter::create(path, spec(1, rate, 16, SampleFormat::Int)).unwrap();
    for &s in samples {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
}

fn err_of<T: std::fmt::Debug>(r: convnet::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn wav_round_trips_every_sample_format() {
    let dir = scratch("formats");
    // Interleaved integer samples, including both extremes of each width.
    for bits in [8u16, 16, 24, 32] {
        let max = (1i64 << (bits - 1)) - 1;
        let min = -(1i64 << (bits - 1));
        let values: Vec<i32> = [min, max, 0, 1, -1, max / 3, min / 7, 5, -9, max / 2]
            .iter()
            .map(|&v| v as i32)
            .collect();
        let scale = 1.0 / (1u64 << (bits - 1)) as f64;
        for channels in [1u16, 2] {
            let path = dir.join(format!("int{bits}_{channels}ch.wav"));
            let mut w =
                WavWriter::create(&path, spec(channels, 11025, bits, SampleFormat::Int)).unwrap();
            for &v in &values {
                match bits {
                    8 => w.write_sample(v as i8).unwrap(),
                    16 => w.write_sample(v as i16).unwrap(),
                    _ => w.write_sample(v).unwrap(),
                }
            }
            w.finalize().unwrap();
            let want: Vec<f32> = values
                .chunks(channels as usize)
                .map(|c| {
                    (c.iter().map(|&v| f64::from(v)).sum::<f64>() * scale / f64::from(channels))
                        as f32
                })
                .collect();
            let wav = read_wav(&path).unwrap();
            assert_eq!(
                (&wav.samples, wav.sample_rate, wav.channels),
                (&want, 11025, channels),
                "{bits}-bit, {channels} channels"
            );
            assert!(wav.samples.iter().all(|v| (-1.0..=1.0).contains(v)));
            if channels == 1 {
                assert_eq!(wav.samples[0], -1.0, "{bits}-bit minimum");
            }
            let again = wav_from_bytes("memory.wav", &std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(again, wav);
        }
    }
    // 16-bit as torchaudio normalises it: divided by 32768.
    write_i16(&dir.join("i16.wav"), 8000, &[16384, -32768, 32767]);
    let wav = read_wav(&dir.join("i16.wav")).unwrap();
    assert_eq!(wav.samples, vec![0.5, -1.0, 32767.0 / 32768.0]);
    // 32-bit float: as stored, channels averaged.
    let path = dir.join("f32.wav");
    let mut w = WavWriter::create(&path, spec(3, 16000, 32, SampleFormat::Float)).unwrap();
    for v in [0.25f32, -0.5, 1.0, 0.125, 0.0, -0.75] {
        w.write_sample(v).unwrap();
    }
    w.finalize().unwrap();
    let wav = read_wav(&path).unwrap();
    assert_eq!(
        (wav.samples, wav.sample_rate, wav.channels),
        (vec![0.25, -0.625 / 3.0], 16000, 3)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Max absolute error and that error relative to the largest expected magnitude.
fn errors(got: &[f32], want: &[f32]) -> (f32, f32) {
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let abs = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    (abs, abs / max.max(f32::MIN_POSITIVE))
}

fn mel_cases(fx: &Fixture) -> Vec<(String, MelSpectrogram, Vec<f32>)> {
    let cases: Vec<String> = fx
        .cases()
        .into_iter()
        .filter(|c| c.starts_with("mel_"))
        .collect();
    assert!(cases.len() >= 7, "{} mel cases", cases.len());
    cases
        .into_iter()
        .map(|case| {
            let s = fx.settings(&case);
            let n = |k: &str| s[k].as_u64().unwrap() as usize;
            let mel = MelSpectrogram::new(
                n("sample_rate") as u32,
                n("n_fft"),
                n("hop_length"),
                n("n_mels"),
            )
            .unwrap();
            let x = fx.tensor(&case, "x").to_vec();
            (case, mel, x)
        })
        .collect()
}

#[test]
fn mel_spectrogram_matches_torchaudio() {
    let fx = Fixture::load("audio.safetensors");
    for (case, mel, x) in mel_cases(&fx) {
        let want64 = fx.tensor(&case, "power64");
        let frames = mel.frames(x.len());
        assert_eq!(want64.dims(), &[mel.n_mels(), frames], "{case}: shape");
        let got = mel.power(&x).unwrap();
        for (name, want) in [
            ("power64", want64.to_vec()),
            ("power32", fx.tensor(&case, "power32").to_vec()),
        ] {
            let (abs, rel) = errors(&got, &want);
            println!("{case}/{name}: max abs err {abs:e}, relative to max {rel:e}");
            let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close(&format!("{case}/{name}"), &got, &want, 0.0, 1e-5 * max);
        }
        let fb = fx.tensor(&case, "fb").to_vec();
        assert_close(&format!("{case}/fb"), &mel.filter_bank(), &fb, 0.0, 1e-6);
    }
}

#[test]
fn log_mel_matches_torchaudio_in_db() {
    let fx = Fixture::load("audio.safetensors");
    let mut floor_seen = false;
    for (case, mel, x) in mel_cases(&fx) {
        let want = fx.tensor(&case, "db64").to_vec();
        let got = mel.log_mel(&x).unwrap();
        let (abs, _) = errors(&got, &want);
        println!("{case}/db64: max abs err {abs:e} dB");
        assert_close(&format!("{case}/db64"), &got, &want, 0.0, 1e-3);
        floor_seen |= want.contains(&-100.0) && got.contains(&-100.0);
        // The same numbers through the options a data set is read with.
        let s = fx.settings(&case);
        let n = |k: &str| s[k].as_u64().unwrap() as usize;
        let opts = AudioOptions {
            sample_rate: n("sample_rate") as u32,
            clip_samples: x.len(),
            features: AudioFeatures::LogMel {
                n_fft: n("n_fft"),
                hop_length: n("hop_length"),
                n_mels: n("n_mels"),
            },
        };
        assert_eq!(
            opts.dims().unwrap(),
            vec![1, mel.n_mels(), mel.frames(x.len())]
        );
        assert_eq!(opts.features(&x).unwrap(), got, "{case}: options");
    }
    assert!(floor_seen, "no case reaches the -100 dB floor");
}

#[test]
fn folders_of_clips_become_feature_sets() {
    let root = scratch("folder");
    for (class, name, len) in [
        ("yes", "b.wav", 900),
        ("no", "z.wav", 1200),
        ("yes", "a.wav", 1000),
    ] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        let samples: Vec<i16> = (0..len).map(|i| ((i * 37) % 2000) as i16 - 1000).collect();
        write_i16(&root.join(class).join(name), 8000, &samples);
    }
    std::fs::write(root.join("yes").join("notes.txt"), "not a clip").unwrap();
    std::fs::write(root.join("README"), "not a class").unwrap();
    let wave = AudioOptions {
        sample_rate: 8000,
        clip_samples: 1000,
        features: AudioFeatures::Waveform,
    };
    let ds = read_folder(&root, &wave).unwrap();
    assert_eq!(ds.classes(), &["no", "yes"]);
    assert_eq!(ds.labels(), &[0, 1, 1]);
    assert_eq!(ds.dims(), &[1, 1000]);
    // yes/a.wav is exactly 1000 samples; yes/b.wav (900) is zero-padded; no/z.wav cut.
    let a = read_wav(&root.join("yes/a.wav")).unwrap().samples;
    assert_eq!(ds.example(1), &a[..]);
    let b = read_wav(&root.join("yes/b.wav")).unwrap().samples;
    assert_eq!(&ds.example(2)[..900], &b[..]);
    assert!(ds.example(2)[900..].iter().all(|&v| v == 0.0));
    let z = read_wav(&root.join("no/z.wav")).unwrap().samples;
    assert_eq!(ds.example(0), &z[..1000]);
    assert_eq!(
        wave.file_features(&root.join("no/z.wav")).unwrap(),
        ds.example(0)
    );

    let mel = AudioOptions {
        features: AudioFeatures::LogMel {
            n_fft: 256,
            hop_length: 100,
            n_mels: 32,
        },
        ..wave
    };
    let ds = read_folder(&root, &mel).unwrap();
    assert_eq!(ds.dims(), &[1, 32, 11]);
    let json = mel.to_json();
    assert!(json.contains("\"kind\":\"log_mel\""), "{json}");
    let back = AudioOptions::from_json(&json).unwrap();
    assert_eq!(back, mel);
    // A new clip gets exactly the features its training twin got.
    assert_eq!(
        back.file_features(&root.join("yes/b.wav")).unwrap(),
        ds.example(2)
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn committed_sample_reads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/spoken-digits-sample");
    let opts = AudioOptions {
        sample_rate: 8000,
        clip_samples: 8000,
        features: AudioFeatures::Waveform,
    };
    let digits = [
        "eight", "five", "four", "nine", "one", "seven", "six", "three", "two", "zero",
    ];
    for split in ["train", "test"] {
        let ds = read_folder(&root.join(split), &opts).unwrap();
        assert_eq!(ds.classes(), &digits, "{split}");
        assert!(ds.len() >= 10, "{split}: {} clips", ds.len());
        // Every clip holds sound, not only padding.
        for i in 0..ds.len() {
            assert!(
                ds.example(i).iter().any(|v| v.abs() > 0.01),
                "{split} clip {i}"
            );
        }
    }
}

#[test]
fn bad_files_and_folders_are_clear_errors() {
    let dir = scratch("bad");
    let ok = dir.join("ok.wav");
    write_i16(&ok, 8000, &vec![100; 1000]);
    let bytes = std::fs::read(&ok).unwrap();

    // Not a WAV at all; an empty file.
    let text = dir.join("text.wav");
    std::fs::write(&text, "hello, this is not audio").unwrap();
    let e = err_of(read_wav(&text));
    assert!(
        e.contains("text.wav") && e.contains("not a WAV file"),
        "{e}"
    );
    std::fs::write(dir.join("empty.wav"), b"").unwrap();
    let e = err_of(read_wav(&dir.join("empty.wav")));
    assert!(
        e.contains("empty.wav") && e.contains("ends inside the header"),
        "{e}"
    );

    // Truncated: the data chunk announces more samples than the file holds.
    let cut = dir.join("cut.wav");
    std::fs::write(&cut, &bytes[..1500]).unwrap();
    let e = err_of(read_wav(&cut));
    assert!(e.contains("cut.wav") && e.contains("truncated"), "{e}");

    // A header claiming ~4 GB of samples: refused before allocating.
    let mut huge = bytes.clone();
    let data = huge.windows(4).position(|w| w == b"data").unwrap();
    huge[data + 4..data + 8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let e = err_of(wav_from_bytes("huge.wav", &huge));
    assert!(
        e.starts_with("huge.wav: ") && e.contains("more than the 600 s"),
        "{e}"
    );

    // A compressed encoding (format tag 2, ADPCM).
    let mut adpcm = bytes.clone();
    let fmt = adpcm.windows(4).position(|w| w == b"fmt ").unwrap();
    adpcm[fmt + 8..fmt + 10].copy_from_slice(&2u16.to_le_bytes());
    let e = err_of(wav_from_bytes("adpcm.wav", &adpcm));
    assert!(
        e.starts_with("adpcm.wav: ") && e.contains("unsupported WAV encoding"),
        "{e}"
    );

    // Non-finite float samples.
    let nan = dir.join("nan.wav");
    let mut w = WavWriter::create(&nan, spec(1, 8000, 32, SampleFormat::Float)).unwrap();
    for v in [0.0f32, f32::NAN] {
        w.write_sample(v).unwrap();
    }
    w.finalize().unwrap();
    let e = err_of(read_wav(&nan));
    assert!(e.contains("nan.wav") && e.contains("non-finite"), "{e}");

    // Folders: a file at the wrong sample rate, an empty class, no classes at all.
    let opts = AudioOptions {
        sample_rate: 8000,
        clip_samples: 800,
        features: AudioFeatures::Waveform,
    };
    let root = dir.join("data");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::create_dir_all(root.join("b")).unwrap();
    write_i16(&root.join("a/1.wav"), 8000, &[1; 900]);
    write_i16(&root.join("b/fast.wav"), 16000, &[1; 900]);
    let e = err_of(read_folder(&root, &opts));
    assert!(
        e.contains("fast.wav") && e.contains("16000 Hz") && e.contains("expected 8000 Hz"),
        "{e}"
    );
    std::fs::remove_file(root.join("b/fast.wav")).unwrap();
    std::fs::write(root.join("b/notes.txt"), "no clips here").unwrap();
    let e = err_of(read_folder(&root, &opts));
    assert!(e.contains("b") && e.contains("empty class folder"), "{e}");
    std::fs::copy(&text, root.join("b/broken.wav")).unwrap();
    let e = err_of(read_folder(&root, &opts));
    assert!(
        e.contains("broken.wav") && e.contains("not a WAV file"),
        "{e}"
    );
    let e = err_of(read_folder(&root.join("a"), &opts));
    assert!(e.contains("no class folders"), "{e}");
    let e = err_of(read_folder(&dir.join("missing"), &opts));
    assert!(e.contains("missing"), "{e}");

    // Options that cannot work, and JSON that is not options.
    let tiny = AudioOptions {
        clip_samples: 100,
        features: AudioFeatures::LogMel {
            n_fft: 400,
            hop_length: 160,
            n_mels: 40,
        },
        ..opts
    };
    assert!(err_of(tiny.dims()).contains("too few"));
    assert!(err_of(MelSpectrogram::new(8000, 64, 0, 10)).contains("hop_length 0"));
    assert!(err_of(MelSpectrogram::new(8000, 1 << 20, 10, 10)).contains("n_fft"));
    for bad in [
        "[]",
        r#"{"sample_rate":8000,"clip_samples":8000,"features":{"kind":"mfcc"}}"#,
        r#"{"sample_rate":8000,"clip_samples":0,"features":{"kind":"waveform"}}"#,
        r#"{"sample_rate":8000,"clip_samples":8000,"features":{"kind":"waveform"},"x":1}"#,
    ] {
        assert!(AudioOptions::from_json(bad).is_err(), "{bad}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
