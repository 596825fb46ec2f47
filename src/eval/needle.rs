//! Needle in a haystack: a passphrase hidden at a chosen depth of filler text of a chosen
//! length, the question that asks for it, and how much of it an answer recovered.

/// A passphrase of three parts, e.g. `amber-otter-4821`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needle {
    pub passphrase: String,
    parts: [String; 3],
}

const ADJECTIVES: &[&str] = &[
    "amber", "violet", "cobalt", "scarlet", "silver", "olive", "ivory", "indigo", "copper",
    "crimson",
];
const NOUNS: &[&str] = &[
    "falcon", "otter", "lantern", "harbor", "meadow", "compass", "glacier", "orchid", "badger",
    "comet",
];

/// Sentences of the haystack: plain, varied, and free of anything like a passphrase.
const FILLER: &[&str] = &[
    "The harbour town woke slowly, its fishing boats rocking against the grey stone quay.",
    "Merchants argued over the price of salt while gulls circled above the market square.",
    "In the library an old clock ticked beside shelves of maritime charts and ledgers.",
    "Rain moved in from the west, and the lamplighters began their rounds a little early.",
    "A ferry crossed to the island twice a day, carrying mail, bread and the odd visitor.",
    "The baker's daughter kept a notebook of every ship that anchored in the bay.",
    "On the hill, the windmill turned steadily, grinding barley for the winter stores.",
    "Children raced along the sea wall, daring each other to jump the widest gaps.",
    "The schoolteacher read aloud from a book about the northern lights and frozen seas.",
    "Fishermen mended their nets in the afternoon sun, trading stories of old storms.",
    "A brass band rehearsed in the town hall for the festival at the end of the month.",
    "The postmistress sorted letters by lamplight, humming a song from her childhood.",
    "Along the river, willows leaned over the water and ducks drifted with the current.",
    "The blacksmith's hammer rang out from dawn, shaping hinges, nails and horseshoes.",
    "Travellers at the inn compared maps and argued about the quickest road inland.",
    "In spring the orchards bloomed white, and bees moved from tree to tree all day.",
    "The harbour master logged the tides each morning in a heavy leather-bound book.",
    "A painter set up her easel on the pier, trying to capture the colour of the fog.",
    "The old lighthouse stood at the end of the point, its lamp cleaned every evening.",
    "By nightfall the streets were quiet, save for the wind and the distant surf.",
];

fn mix(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed ^ 0x2545_f491_4f6c_dd1d;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

impl Needle {
    pub fn new(seed: u64) -> Self {
        let mut next = mix(seed);
        let a = ADJECTIVES[(next() % ADJECTIVES.len() as u64) as usize].to_string();
        let n = NOUNS[(next() % NOUNS.len() as u64) as usize].to_string();
        let d = (1000 + next() % 9000).to_string();
        Self {
            passphrase: format!("{a}-{n}-{d}"),
            parts: [a, n, d],
        }
    }

    pub fn sentence(&self) -> String {
        format!(
            "The secret passphrase for the lighthouse archive is {}.",
            self.passphrase
        )
    }

    /// The share of the passphrase's three parts the answer contains: 0, 1/3, 2/3 or 1.
    pub fn score(&self, answer: &str) -> f64 {
        let answer = answer.to_lowercase();
        let found = self
            .parts
            .iter()
            .filter(|p| answer.contains(p.as_str()))
            .count();
        found as f64 / self.parts.len() as f64
    }
}

/// About `chars` characters of filler in whole sentences (seeded order), with the needle's
/// sentence inserted at `depth_percent` of the way through (0: first, 100: last).
pub fn haystack(chars: usize, depth_percent: u32, needle: &Needle, seed: u64) -> String {
    let mut next = mix(seed.wrapping_add(1));
    let mut sentences: Vec<&str> = Vec::new();
    let mut len = 0;
    while len < chars {
        let s = FILLER[(next() % FILLER.len() as u64) as usize];
        len += s.len() + 1;
        sentences.push(s);
    }
    let at = (sentences.len() * depth_percent.min(100) as usize).div_ceil(100);
    let needle = needle.sentence();
    sentences.insert(at.min(sentences.len()), &needle);
    sentences.join(" ")
}

/// The prompt: the haystack, then the question.
pub fn question(haystack: &str) -> String {
    format!(
        "{haystack}\n\nWhat is the secret passphrase for the lighthouse archive mentioned in \
         the text above? Answer with the passphrase only."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_needle_sits_at_its_depth() {
        let n = Needle::new(7);
        for (depth, lo, hi) in [(0, 0.0, 0.01), (50, 0.4, 0.6), (100, 0.95, 1.0)] {
            let h = haystack(8000, depth, &n, 3);
            assert!((7900..8200).contains(&h.len()), "{}", h.len());
            let at = h.find(&n.passphrase).unwrap() as f64 / h.len() as f64;
            assert!((lo..=hi).contains(&at), "depth {depth}: at {at}");
            assert_eq!(h.matches("passphrase").count(), 1);
        }
        assert_eq!(haystack(500, 30, &n, 3), haystack(500, 30, &n, 3), "seeded");
        assert_ne!(Needle::new(7), Needle::new(8));
    }

    #[test]
    fn the_score_counts_the_parts_found() {
        let n = Needle::new(1);
        assert_eq!(
            n.score(&format!("It is {}.", n.passphrase.to_uppercase())),
            1.0
        );
        assert_eq!(n.score("no idea"), 0.0);
        let [a, b, _] = &n.parts;
        assert!((n.score(&format!("{a} {b}")) - 2.0 / 3.0).abs() < 1e-9);
        assert!(question("hay").starts_with("hay\n\n"));
    }
}
