//! The page of `vtr-index serve` in a real browser: Debian's Chromium, headless, driven through
//! chromedriver (WebDriver). Ignored by a plain `cargo test`, which has no browser; the test
//! command runs them where `.ci/run` installed one (`VTR_INDEX_BROWSER=1`) and fails if they did
//! not run. Screenshots go to `target/browser/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::explorer::{self, labelled_index};
use crate::serve::{Service, encode};
use crate::util::{Dir, fixtures, ingest_command};

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver) is installed");
        let due = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < due, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session as the machine's probe starts one, as root.
async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session")
}

/// Evaluates `script` (a function body) in the page until it returns something other than
/// null or false, at most 30 s.
async fn until(client: &Client, what: &str, script: &str) -> Value {
    let due = Instant::now() + Duration::from_secs(30);
    loop {
        let value = client.execute(script, vec![]).await.unwrap();
        if !value.is_null() && value != json!(false) {
            return value;
        }
        if Instant::now() > due {
            let state = client
                .execute("return document.getElementById('status').textContent + ' | ' + document.body.innerText.slice(0, 2000)", vec![])
                .await
                .unwrap();
            panic!("{what}: not within 30 s; the page says {state}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn screenshots() -> PathBuf {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    std::fs::create_dir_all(&folder).unwrap();
    folder
}

/// Every thumbnail matched by `selector` has loaded as an image.
const ALL_LOADED: &str = "const imgs = [...document.querySelectorAll(arguments[0] || '.result img.thumb')];
    return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : null;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and chromedriver (Debian's chromium, chromium-driver): VTR_INDEX_BROWSER=1 bash scripts/test.sh"]
async fn the_page_searches_plays_pages_and_shows_hostile_names_as_text() {
    let dir = Dir::new();
    let root = dir.join("videos");
    let videos = fixtures().join("videos");
    let copies: Vec<(String, &str)> = vec![
        ("long_h264.mp4".into(), "long_h264.mp4"),
        ("mandelbrot_vp9.webm".into(), "mandelbrot_vp9.webm"),
        ("bars_mpeg4.avi".into(), "bars_mpeg4.avi"),
        ("<script>alert(1)</script>.mp4".into(), "short_h264.mp4"),
        // Two files of one id: a duplicate_id failure whose message names both, markup and all.
        ("<b onmouseover=alert(2)>dup</b>.mp4".into(), "vfr_h264.mp4"),
        ("<b onmouseover=alert(2)>dup</b>.mkv".into(), "portrait_hevc.mkv"),
    ];
    // Enough copies of one clip that results take two pages (their bytes are reused, not decoded).
    let copies: Vec<(String, &str)> =
        copies.into_iter().chain((0..20).map(|n| (format!("copies/short-{n:02}.mp4"), "rotated90_h264.mp4"))).collect();
    for (name, source) in &copies {
        let to = root.join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(videos.join(source), &to).unwrap();
    }
    let index = dir.join("index");
    ingest_command(&index, &root, &[]).expect_code(2);
    let service = Service::start(&index, &[]);
    let state = service.get_json("/api/v1/index");
    let video_count = state["videos"].as_u64().unwrap();
    assert_eq!(video_count, 25);

    let driver = Driver::start();
    let client = browser(&driver, &dir.join("chromium-profile")).await;
    client.goto(&service.url).await.unwrap();
    until(&client, "the index's facts", "return document.querySelectorAll('#facts dd').length > 0").await;
    let facts: String = client.find(Locator::Id("facts")).await.unwrap().text().await.unwrap();
    assert!(facts.contains("25"), "{facts}");

    // A query: a grid of thumbnails, each its video's best frame, with score, time and id.
    client.find(Locator::Id("query")).await.unwrap().send_keys("colourful moving pattern").await.unwrap();
    client.find(Locator::Css("#search-form button")).await.unwrap().click().await.unwrap();
    let shown = until(
        &client,
        "a page of results",
        "const n = document.querySelectorAll('.result').length; return n === 20 ? n : null",
    )
    .await;
    assert_eq!(shown, 20);
    let loaded = until(&client, "the thumbnails", ALL_LOADED).await;
    assert_eq!(loaded, 20);
    let api = service.get_json(&format!("/api/v1/search?q={}&limit=20", encode("colourful moving pattern")));
    let cards = client
        .execute(
            "return [...document.querySelectorAll('.result')].map(c => [c.dataset.videoId,
                c.querySelector('.video-id').textContent, c.querySelector('.score').textContent,
                c.querySelector('.time').textContent, new URL(c.querySelector('img').src).search])",
            vec![],
        )
        .await
        .unwrap();
    for (card, hit) in cards.as_array().unwrap().iter().zip(api["page"]["items"].as_array().unwrap()) {
        let id = hit["video_id"].as_str().unwrap();
        assert_eq!(card[0], id);
        assert_eq!(card[1], id, "the id is shown as text");
        assert_eq!(card[2], format!("{:.2}", hit["score"].as_f64().unwrap()));
        let time = hit["best_frame_s"].as_f64().unwrap();
        assert_eq!(card[3], format!("{time:.2} s"));
        assert_eq!(card[4], format!("?id={}&t={time:.3}", url_component(id)), "the thumbnail of the best frame");
    }
    client.screenshot().await.map(|png| std::fs::write(screenshots().join("results.png"), png)).unwrap().unwrap();

    // Hostile names are text: no script ran, no element came from a name.
    let hostile = client
        .execute(
            "return [document.scripts.length, document.querySelectorAll('#results b, #results script').length,
                [...document.querySelectorAll('.result .video-id')].map(e => e.textContent)]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(hostile[0], 1, "only page.js");
    assert_eq!(hostile[1], 0);

    // Paging.
    client.find(Locator::Id("next")).await.unwrap().click().await.unwrap();
    until(&client, "the second page", "return document.getElementById('page-info').textContent === '21–25 of 25'")
        .await;
    assert_eq!(until(&client, "its thumbnails", ALL_LOADED).await, 5);
    let second: Vec<String> = ids_on_page(&client).await;
    let second_api =
        service.get_json(&format!("/api/v1/search?q={}&offset=20&limit=20", encode("colourful moving pattern")));
    let want: Vec<String> = second_api["page"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["video_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(second, want);
    client.find(Locator::Id("prev")).await.unwrap().click().await.unwrap();
    until(&client, "the first page again", "return document.getElementById('page-info').textContent === '1–20 of 25'")
        .await;
    let script_card = ids_on_page(&client).await.iter().any(|id| id == "<script>alert(1)</script>");
    let on_second = want.iter().any(|id| id == "<script>alert(1)</script>");
    assert!(script_card || on_second, "the video named <script> is listed");

    // Playback from the best frame's time: an H.264 MP4 and a VP9 WebM play, an AVI shows its frames.
    for (id, plays) in [("long_h264", true), ("mandelbrot_vp9", true), ("bars_mpeg4", false)] {
        let start = best_time(&service, id);
        // The time the player lands on once its first seek is done.
        client
            .execute(
                "const v = document.getElementById('player-video'); delete v.dataset.landed;
                 v.addEventListener('seeked', () => { v.dataset.landed = String(v.currentTime) }, { once: true });",
                vec![],
            )
            .await
            .unwrap();
        open_player(&client, id).await;
        if plays {
            let at = until(
                &client,
                &format!("{id} playing from {start}"),
                "const v = document.getElementById('player-video');
                 return !v.hidden && v.dataset.landed !== undefined ? Number(v.dataset.landed) : null",
            )
            .await;
            let at = at.as_f64().unwrap();
            assert!((at - start).abs() < 0.25, "{id}: the player starts at {at} s, the best frame is at {start} s");
            client
                .screenshot()
                .await
                .map(|png| std::fs::write(screenshots().join(format!("{id}.png")), png))
                .unwrap()
                .unwrap();
        } else {
            let frames = service.get_json(&format!("/api/v1/video?id={id}"))["frame_times"].as_array().unwrap().len();
            let strip = until(&client, "the frame strip", &ALL_LOADED.replace("arguments[0]", "'#strip img'")).await;
            assert_eq!(strip, frames);
            let hidden = client.execute("return document.getElementById('player-video').hidden", vec![]).await.unwrap();
            assert_eq!(hidden, true, "no player for a format the browser cannot play");
        }
    }

    // More like this.
    let first_id = ids_on_page(&client).await[0].clone();
    let more = client.find(Locator::Css(".result button.similar")).await.unwrap();
    more.click().await.unwrap();
    until(
        &client,
        "similar videos",
        "return document.getElementById('results-title').textContent.startsWith('Videos like')",
    )
    .await;
    until(&client, "their thumbnails", ALL_LOADED).await;
    let similar = ids_on_page(&client).await;
    let want = service.get_json(&format!("/api/v1/similar?id={}&limit=20", encode(&first_id)));
    let want: Vec<String> =
        want["page"]["items"].as_array().unwrap().iter().map(|h| h["video_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(similar, want);
    assert!(!similar.contains(&first_id));

    // The index's state: plots drawn, runs, and failures whose markup is text.
    until(&client, "the plots", &ALL_LOADED.replace("arguments[0]", "'#plots img'")).await;
    until(&client, "the runs table", "return document.querySelectorAll('#runs tbody tr').length === 1").await;
    let failures = until(
        &client,
        "the failures table",
        "const rows = [...document.querySelectorAll('#failures tbody tr')];
         return rows.length ? [rows.map(r => r.querySelector('td.message').textContent),
           document.querySelectorAll('#failures b').length] : null",
    )
    .await;
    let messages = failures[0].as_array().unwrap();
    assert!(messages.iter().any(|m| m.as_str().unwrap().contains("<b onmouseover=alert(2)>dup</b>")), "{messages:?}");
    assert_eq!(failures[1], 0, "no element from a failure's text");
    client.execute("document.getElementById('state').scrollIntoView()", vec![]).await.unwrap();
    client.screenshot().await.map(|png| std::fs::write(screenshots().join("state.png"), png)).unwrap().unwrap();
    client.close().await.unwrap();
}

/// The ids of the result cards, in order.
async fn ids_on_page(client: &Client) -> Vec<String> {
    let ids = client
        .execute("return [...document.querySelectorAll('.result')].map(c => c.dataset.videoId)", vec![])
        .await
        .unwrap();
    ids.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

/// The best frame's time of `id` for the query on screen.
fn best_time(service: &Service, id: &str) -> f64 {
    let page = service.get_json(&format!("/api/v1/search?q={}&limit=100", encode("colourful moving pattern")));
    let hit = page["page"]["items"].as_array().unwrap().iter().find(|h| h["video_id"] == id).unwrap().clone();
    hit["best_frame_s"].as_f64().unwrap()
}

/// Clicks the thumbnail of `id`, on whichever page of results it is.
async fn open_player(client: &Client, id: &str) {
    if client.execute("return !document.getElementById('prev').disabled", vec![]).await.unwrap() == json!(true) {
        client.find(Locator::Id("prev")).await.unwrap().click().await.unwrap();
        until(client, "the first page", "return document.getElementById('page-info').textContent.startsWith('1–')")
            .await;
    }
    for _ in 0..2 {
        let clicked = client
            .execute(
                "const card = [...document.querySelectorAll('.result')].find(c => c.dataset.videoId === arguments[0]);
                 if (!card) return false;
                 card.querySelector('img.thumb').click();
                 return true;",
                vec![json!(id)],
            )
            .await
            .unwrap();
        if clicked == json!(true) {
            until(
                client,
                "the player",
                &format!("return document.getElementById('player-title').textContent === {}", json!(id)),
            )
            .await;
            return;
        }
        client.find(Locator::Id("next")).await.unwrap().click().await.unwrap();
        until(client, "the next page", "return document.getElementById('page-info').textContent.startsWith('21')")
            .await;
    }
    panic!("{id} is not among the results");
}

/// `encodeURIComponent` as URLSearchParams writes it: a space is `+`.
fn url_component(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => (b as char).to_string(),
            b' ' => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The score explorer on the labelled index: the folders' metrics, the comparison of `none` and
/// `dsl` (its counts, its histogram, the most improved captions first, their true videos'
/// thumbnails), the queries filtered by outcome and sorted by rank, and a folder named with
/// markup shown as text. Screenshots: `explorer.png` (copied to
/// `docs/images/explorer-none-dsl.png` for the README) and `explorer-queries.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and chromedriver (Debian's chromium, chromium-driver): VTR_INDEX_BROWSER=1 bash scripts/test.sh"]
async fn the_explorer_compares_none_and_dsl_and_pages_the_queries() {
    let dir = Dir::new();
    let labelled = labelled_index(&dir, "index", usize::MAX);
    let reference = explorer::reference();
    let service =
        Service::start(&labelled.index, &["--scores", labelled.none.to_str().unwrap(), labelled.dsl.to_str().unwrap()]);
    let driver = Driver::start();
    let client = browser(&driver, &dir.join("chromium-profile")).await;
    client.goto(&service.url).await.unwrap();

    // The metrics table: each folder's R@1 as metrics.json has it.
    let rows = until(
        &client,
        "the scores table",
        "const rows = [...document.querySelectorAll('#score-folders tbody tr')];
         return rows.length === 2 ? rows.map(r => [...r.cells].map(c => c.textContent)) : null",
    )
    .await;
    for (row, revise) in rows.as_array().unwrap().iter().zip(["none", "dsl"]) {
        assert_eq!(row[1], revise);
        let r1 = reference["metrics"][revise]["r1"].as_f64().unwrap();
        assert_eq!(row[4], format!("{r1:.1}"), "{row}");
    }

    // The comparison: counts, histogram, the most improved captions first with their videos.
    let changes: Vec<i64> = reference["changes"].as_array().unwrap().iter().map(|c| c.as_i64().unwrap()).collect();
    let count = |keep: fn(&i64) -> bool| changes.iter().filter(|c| keep(c)).count();
    let summary = until(
        &client,
        "the comparison",
        "const s = document.getElementById('comparison-summary').textContent; return s || null",
    )
    .await;
    let want =
        format!("captions ranked their video higher, {} lower, {} the same", count(|c| *c < 0), count(|c| *c == 0));
    assert!(summary.as_str().unwrap().contains(&format!("{} {want}", count(|c| *c > 0))), "{summary}");
    until(&client, "the histogram", &ALL_LOADED.replace("arguments[0]", "'#changes-plot'")).await;
    let mut improved: Vec<usize> = (0..changes.len()).filter(|&t| changes[t] > 0).collect();
    improved.sort_by_key(|&t| (-changes[t], t));
    let listed = until(
        &client,
        "the improved captions",
        "const rows = [...document.querySelectorAll('#changes tbody tr')];
         return rows.length ? rows.map(r => [Number(r.dataset.textId), r.querySelector('.caption').textContent]) : null",
    )
    .await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), improved.len().min(20));
    for (row, &t) in listed.iter().zip(&improved) {
        assert_eq!(row[0], t);
        assert_eq!(row[1], reference["captions"][t]["text"]);
    }
    until(&client, "their videos' thumbnails", &ALL_LOADED.replace("arguments[0]", "'#changes img'")).await;
    let explorer = client.find(Locator::Id("explorer")).await.unwrap();
    client.execute("document.getElementById('explorer').scrollIntoView()", vec![]).await.unwrap();
    let png = explorer.screenshot().await.unwrap();
    std::fs::write(screenshots().join("explorer.png"), png).unwrap();

    // The queries of dsl whose video is beyond rank 10, then those at rank 1, worst first.
    let ranks: Vec<u64> = reference["ranks"]["dsl"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect();
    let choose = |id: &str, value: &str| {
        format!(
            "const s = document.getElementById('{id}'); s.value = '{value}'; s.dispatchEvent(new Event('change', {{bubbles: true}}));"
        )
    };
    client.execute(&choose("queries-folder", "1"), vec![]).await.unwrap();
    client.execute(&choose("queries-outcome", "beyond"), vec![]).await.unwrap();
    let beyond: Vec<usize> = (0..ranks.len()).filter(|&t| ranks[t] > 10).collect();
    let shown = until(
        &client,
        "the queries beyond rank 10",
        &format!(
            "return document.getElementById('queries-info').textContent === '1–{n} of {n}'
               ? [...document.querySelectorAll('.query')].map(q => Number(q.dataset.textId)) : null",
            n = beyond.len()
        ),
    )
    .await;
    assert_eq!(shown, json!(beyond));
    client.execute(&choose("queries-outcome", "r1"), vec![]).await.unwrap();
    client.execute(&choose("queries-sort", "-rank"), vec![]).await.unwrap();
    let at_one = ranks.iter().filter(|&&r| r == 1).count();
    until(
        &client,
        "the queries at rank 1",
        &format!("return document.getElementById('queries-info').textContent === '1–10 of {at_one}'"),
    )
    .await;
    // Each query: its caption, its top k with the true video marked first, all loaded.
    let first = until(
        &client,
        "a query's top k",
        "const q = document.querySelector('.query');
         return q ? [q.querySelector('.caption').textContent, q.querySelectorAll('figure').length,
           q.querySelector('figure').classList.contains('true')] : null",
    )
    .await;
    let t = (0..ranks.len()).find(|&t| ranks[t] == 1).unwrap();
    assert_eq!(first, json!([reference["captions"][t]["text"], 10, true]));
    until(&client, "the top-k thumbnails", &ALL_LOADED.replace("arguments[0]", "'.query img'")).await;
    let png = client.find(Locator::Id("queries")).await.unwrap().screenshot().await.unwrap();
    std::fs::write(screenshots().join("explorer-queries.png"), png).unwrap();
    drop(service);

    // A folder whose name holds markup is shown as text.
    let hostile = dir.copy(&labelled.dsl, "<img src=x onerror=alert(3)>dsl");
    let service =
        Service::start(&labelled.index, &["--scores", labelled.none.to_str().unwrap(), hostile.to_str().unwrap()]);
    client.goto(&service.url).await.unwrap();
    let names = until(
        &client,
        "the scores table",
        "const rows = [...document.querySelectorAll('#score-folders tbody tr')];
         return rows.length === 2 && document.getElementById('comparison-summary').textContent
           ? [rows[1].cells[0].textContent, document.getElementById('comparison-summary').textContent] : null",
    )
    .await;
    assert_eq!(names[0], "<img src=x onerror=alert(3)>dsl");
    assert!(names[1].as_str().unwrap().starts_with("<img src=x onerror=alert(3)>dsl (dsl) against"), "{names}");
    let elements = client
        .execute("return [document.scripts.length, document.querySelectorAll('img[src=x]').length]", vec![])
        .await
        .unwrap();
    assert_eq!(elements, json!([1, 0]), "only page.js; no element from a folder's name");
    client.close().await.unwrap();
}
