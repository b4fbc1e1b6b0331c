//! CLIP's text tokenizer: the cleaning OpenAI's `SimpleTokenizer` applies (ftfy's default
//! fixes, HTML-unescape twice, whitespace collapsed, lower case) in front of the byte-level BPE
//! of `instant-clip-tokenizer`, which ships the real `bpe_simple_vocab_16e6` vocabulary.
//!
//! Sequences run from the start token (49406) to the end token (49407) inclusive, at most
//! the context length (77); a longer text is cut so that the end token takes the last place,
//! as `clip.tokenize(…, truncate=True)` and open_clip do.

use instant_clip_tokenizer::{Token, Tokenizer};
use unicode_normalization::UnicodeNormalization;

pub const START_OF_TEXT: u32 = 49406;
pub const END_OF_TEXT: u32 = 49407;
pub const CONTEXT_LENGTH: usize = 77;

pub struct ClipTokenizer {
    bpe: Tokenizer,
    context_length: usize,
}

impl ClipTokenizer {
    /// Building the merge table takes a few tens of milliseconds: build one and reuse it.
    pub fn new(context_length: usize) -> ClipTokenizer {
        let bpe = Tokenizer::new();
        debug_assert_eq!(u32::from(bpe.start_of_text().to_u16()), START_OF_TEXT);
        debug_assert_eq!(u32::from(bpe.end_of_text().to_u16()), END_OF_TEXT);
        ClipTokenizer { bpe, context_length: context_length.max(2) }
    }

    /// Token ids of one text, start token to end token.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = clean(text);
        let mut tokens: Vec<Token> = Vec::new();
        self.bpe.encode(&cleaned, &mut tokens);
        let mut ids = Vec::with_capacity(tokens.len().min(self.context_length) + 2);
        ids.push(START_OF_TEXT);
        ids.extend(tokens.iter().take(self.context_length - 2).map(|t| u32::from(t.to_u16())));
        ids.push(END_OF_TEXT);
        ids
    }

    /// True when the text has no token at all once cleaned (empty or only whitespace).
    pub fn is_blank(text: &str) -> bool {
        clean(text).is_empty()
    }
}

/// `whitespace_clean(basic_clean(text)).lower()` of OpenAI's tokenizer.
/// `instant-clip-tokenizer` lower-cases again, which changes nothing.
pub fn clean(text: &str) -> String {
    let fixed = fix_text(text);
    // html.unescape twice: captions scraped from the web are often escaped twice (`&amp;amp;`).
    let once = html_escape::decode_html_entities(&fixed);
    let twice = html_escape::decode_html_entities(&once);
    twice.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// The fixes of `ftfy.fix_text` (default settings) that can apply to a caption, in ftfy's
/// order: terminal escapes removed, Latin ligatures and full-width characters replaced,
/// curly quotes straightened, line breaks unified, control characters dropped, NFC.
/// Mojibake repair (`fix_encoding`) is left out: it guesses at a wrong decoding of the bytes,
/// and caption files read as UTF-8 do not need it.
fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            // A terminal escape such as `ESC[1;31m`: parameters, then one final letter.
            chars.next();
            while let Some(&p) = chars.peek() {
                chars.next();
                if p.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        if let Some(expanded) = latin_ligature(c) {
            out.push_str(expanded);
            continue;
        }
        match c {
            '\u{ff01}'..='\u{ff5e}' => out.push(char::from_u32(c as u32 - 0xfee0).unwrap_or(c)),
            '\u{3000}' => out.push(' '),
            '\u{2018}'..='\u{201b}' | '\u{02bc}' => out.push('\''),
            '\u{201c}'..='\u{201f}' => out.push('"'),
            '\r' | '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('\n'),
            c if is_removed_control(c) => {}
            c => out.push(c),
        }
    }
    out.nfc().collect()
}

fn latin_ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// ftfy's `remove_control_chars`: C0 controls other than tab and line feed (form feed and
/// vertical tab become spaces later anyway), DEL, deprecated format characters, the byte
/// order mark and interlinear annotation marks.
fn is_removed_control(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{8}' | '\u{e}'..='\u{1f}' | '\u{7f}'
        | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}'
        | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e007f}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_follows_openai_basic_and_whitespace_clean() {
        assert_eq!(clean("  A  Man\tplays GUITAR!!  "), "a man plays guitar!!");
        assert_eq!(clean("cafe &amp;amp; naive"), "cafe & naive");
        assert_eq!(clean("it\u{2019}s \u{201c}fine\u{201d}"), "it's \"fine\"");
        assert_eq!(clean("\u{fb01}ne \u{ff21}\u{ff22}"), "fine ab");
        assert_eq!(clean("e\u{301}t\u{e9}"), "\u{e9}t\u{e9}");
        assert_eq!(clean("\u{1b}[1;31mred\u{1b}[0m alert"), "red alert");
    }

    #[test]
    fn truncation_keeps_the_end_token_last() {
        let tokenizer = ClipTokenizer::new(CONTEXT_LENGTH);
        let ids = tokenizer.encode(&"word ".repeat(200));
        assert_eq!(ids.len(), CONTEXT_LENGTH);
        assert_eq!(ids[0], START_OF_TEXT);
        assert_eq!(ids[CONTEXT_LENGTH - 1], END_OF_TEXT);
        assert_eq!(tokenizer.encode(""), vec![START_OF_TEXT, END_OF_TEXT]);
    }
}
