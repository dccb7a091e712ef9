//! The fixed texts of push notifications, in the recipient's preferred language.
//!
//! A language tag is matched on its primary subtag, case-insensitively (`pt-BR`, `pt_PT` and
//! `PT` all pick `pt`); an unknown or missing language falls back to English.

/// The texts of one language.
#[derive(Debug, PartialEq, Eq)]
pub struct Texts {
    /// The language code these texts are in (`en`, `pt`, ...).
    pub code: &'static str,
    /// Body of an image message.
    pub photo: &'static str,
    /// Body of an audio message.
    pub audio: &'static str,
    /// Body of a voice message.
    pub voice: &'static str,
    /// Body of a video message.
    pub video: &'static str,
    /// Body of a file message.
    pub file: &'static str,
    /// Title of a group message: `{sender}` and `{group}` are replaced.
    pub in_group: &'static str,
}

const TABLE: &[Texts] = &[
    Texts {
        code: "en",
        photo: "sent a photo",
        audio: "sent an audio",
        voice: "sent a voice message",
        video: "sent a video",
        file: "sent a file",
        in_group: "{sender} in {group}",
    },
    Texts {
        code: "pt",
        photo: "enviou uma foto",
        audio: "enviou um áudio",
        voice: "enviou uma mensagem de voz",
        video: "enviou um vídeo",
        file: "enviou um arquivo",
        in_group: "{sender} em {group}",
    },
    Texts {
        code: "es",
        photo: "envió una foto",
        audio: "envió un audio",
        voice: "envió un mensaje de voz",
        video: "envió un video",
        file: "envió un archivo",
        in_group: "{sender} en {group}",
    },
    Texts {
        code: "fr",
        photo: "a envoyé une photo",
        audio: "a envoyé un audio",
        voice: "a envoyé un message vocal",
        video: "a envoyé une vidéo",
        file: "a envoyé un fichier",
        in_group: "{sender} dans {group}",
    },
    Texts {
        code: "de",
        photo: "hat ein Foto gesendet",
        audio: "hat eine Audiodatei gesendet",
        voice: "hat eine Sprachnachricht gesendet",
        video: "hat ein Video gesendet",
        file: "hat eine Datei gesendet",
        in_group: "{sender} in {group}",
    },
    Texts {
        code: "ar",
        photo: "أرسل صورة",
        audio: "أرسل مقطعًا صوتيًا",
        voice: "أرسل رسالة صوتية",
        video: "أرسل فيديو",
        file: "أرسل ملفًا",
        in_group: "{sender} في {group}",
    },
    Texts {
        code: "tr",
        photo: "bir fotoğraf gönderdi",
        audio: "bir ses dosyası gönderdi",
        voice: "bir sesli mesaj gönderdi",
        video: "bir video gönderdi",
        file: "bir dosya gönderdi",
        in_group: "{sender} ({group})",
    },
    Texts {
        code: "id",
        photo: "mengirim foto",
        audio: "mengirim audio",
        voice: "mengirim pesan suara",
        video: "mengirim video",
        file: "mengirim file",
        in_group: "{sender} di {group}",
    },
];

/// The language codes with texts, English first.
pub fn languages() -> impl Iterator<Item = &'static str> {
    TABLE.iter().map(|t| t.code)
}

/// The texts for a preferred language tag (`None`, empty or unknown: English).
pub fn for_language(tag: Option<&str>) -> &'static Texts {
    let primary = tag
        .and_then(|t| t.trim().split(['-', '_']).next())
        .map(str::to_ascii_lowercase);
    primary
        .and_then(|p| TABLE.iter().find(|t| t.code == p))
        .unwrap_or(&TABLE[0])
}

impl Texts {
    /// The fixed text of a media kind (`image`, `audio`, `voice`, `video`, `file`); `None` for
    /// text and unknown kinds.
    pub fn media(&self, kind: &str) -> Option<&'static str> {
        match kind {
            "image" | "photo" => Some(self.photo),
            "audio" => Some(self.audio),
            "voice" => Some(self.voice),
            "video" => Some(self.video),
            "file" => Some(self.file),
            _ => None,
        }
    }

    /// The title: the sender's name, or "`sender` in `group`" for a group.
    pub fn title(&self, sender: &str, group: Option<&str>) -> String {
        match group {
            Some(g) if !g.is_empty() => self
                .in_group
                .replace("{sender}", sender)
                .replace("{group}", g),
            _ => sender.to_owned(),
        }
    }

    /// The body: the text preview of a text message; for media, the fixed text, followed by
    /// the caption when there is one (`preview` is the caption, or `[kind]` without one).
    pub fn body(&self, kind: &str, preview: &str) -> String {
        match self.media(kind) {
            None => preview.to_owned(),
            Some(fixed) => {
                let bare = preview.is_empty()
                    || preview
                        .strip_prefix('[')
                        .and_then(|p| p.strip_suffix(']'))
                        .is_some_and(|k| k == kind);
                if bare {
                    fixed.to_owned()
                } else {
                    format!("{fixed}: {preview}")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_primary_subtag() {
        assert_eq!(for_language(Some("pt-BR")).code, "pt");
        assert_eq!(for_language(Some("PT_pt")).code, "pt");
        assert_eq!(for_language(Some("de")).code, "de");
        assert_eq!(for_language(Some("zz")).code, "en");
        assert_eq!(for_language(Some("")).code, "en");
        assert_eq!(for_language(None).code, "en");
        assert_eq!(languages().count(), 8);
    }

    #[test]
    fn titles_and_bodies() {
        let pt = for_language(Some("pt-BR"));
        assert_eq!(pt.title("Ana", None), "Ana");
        assert_eq!(pt.title("Ana", Some("Família")), "Ana em Família");
        assert_eq!(pt.body("text", "olá"), "olá");
        assert_eq!(pt.body("image", "[image]"), "enviou uma foto");
        assert_eq!(pt.body("image", "praia"), "enviou uma foto: praia");
        assert_eq!(for_language(None).body("file", ""), "sent a file");
        assert_eq!(
            for_language(Some("fr")).body("video", "[video]"),
            "a envoyé une vidéo"
        );
        assert_eq!(for_language(None).body("weird", "[weird]"), "[weird]");
    }
}
