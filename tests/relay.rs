//! Relay behaviour after the 101: messages both ways, control frames, close codes,
//! limits, timeouts and backpressure.

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::{
        CloseFrame,
        frame::{
            Frame,
            coding::{CloseCode, Data, OpCode},
        },
    },
};

#[tokio::test]
async fn text_binary_and_fragmented_messages_round_trip() {
    let gw = Gw::echo().await;
    let mut ws = gw.connect("/echo").await;
    assert_eq!(roundtrip(&mut ws, "hello").await, "hello");
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &[0, 1, 2, 255]),
        other => panic!("{other:?}"),
    }
    // One message in three fragments arrives whole.
    ws.send(Message::Frame(Frame::message("frag", OpCode::Data(Data::Text), false)))
        .await
        .unwrap();
    ws.send(Message::Frame(Frame::message("ment", OpCode::Data(Data::Continue), false)))
        .await
        .unwrap();
    ws.send(Message::Frame(Frame::message("ed", OpCode::Data(Data::Continue), true)))
        .await
        .unwrap();
    match tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap() {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "fragmented"),
        other => panic!("{other:?}"),
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await, (1000, "done".into()));
    gw.wait_metric(r#"wsgate_closes_total{route="echo",code="1000",initiator="client"}"#, 1.0)
        .await;
    assert_eq!(
        gw.metric(r#"wsgate_messages_total{route="echo",direction="client_to_upstream"}"#)
            .await,
        3.0
    );
    assert_eq!(
        gw.metric(r#"wsgate_messages_total{route="echo",direction="upstream_to_client"}"#)
            .await,
        3.0
    );
    assert_eq!(
        gw.metric(r#"wsgate_bytes_total{route="echo",direction="client_to_upstream"}"#)
            .await,
        19.0
    );
}

#[tokio::test]
async fn many_messages_arrive_in_order() {
    let gw = Gw::echo().await;
    let mut ws = gw.connect("/echo").await;
    let n = 2000;
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            tx.send(Message::text(format!("m{i}"))).await.unwrap();
        }
        tx
    });
    for i in 0..n {
        match tokio::time::timeout(TIMEOUT, rx.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), format!("m{i}")),
            other => panic!("{other:?}"),
        }
    }
    let tx = sender.await.unwrap();
    ws = tx.reunite(rx).unwrap();
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn ping_is_answered_and_passed_on() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &route("r", "/r", &up.url(), "none")).await;
    let mut ws = gw.connect("/r").await;
    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    let mut pongs = 0;
    // Exactly one pong comes back, then the echo of a text message.
    ws.send(Message::text("after")).await.unwrap();
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap() {
            Some(Ok(Message::Pong(p))) => {
                assert_eq!(&p[..], b"are you there");
                pongs += 1;
            }
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), "after");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    // Give a duplicate pong (from the upstream's own answer) a chance to show up.
    ws.send(Message::text("again")).await.unwrap();
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap() {
            Some(Ok(Message::Pong(_))) => pongs += 1,
            Some(Ok(Message::Text(_))) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(pongs, 1);
    assert!(
        up.log
            .lock()
            .unwrap()
            .messages
            .iter()
            .any(|m| matches!(m, Message::Ping(p) if &p[..] == b"are you there"))
    );
}

#[tokio::test]
async fn close_codes_pass_through_both_ways() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &route("r", "/r", &up.url(), "none")).await;
    let mut ws = gw.connect("/r").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "client bye".into(),
    }))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await.0, 4000);
    gw.wait_metric(r#"wsgate_closes_total{route="r",code="4xxx",initiator="client"}"#, 1.0)
        .await;
    assert_eq!(up.log.lock().unwrap().closes, vec![Some((4000, "client bye".to_string()))]);

    let up = upstream(Behaviour::CloseWith(4002)).await;
    let gw = Gw::start("", &route("r", "/r", &up.url(), "none")).await;
    let mut ws = gw.connect("/r").await;
    assert_eq!(close_code(&mut ws).await, (4002, "upstream says bye".into()));
    gw.wait_metric(r#"wsgate_closes_total{route="r",code="4xxx",initiator="upstream"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn client_close_with_forbidden_code_gets_1002() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &route("r", "/r", &up.url(), "none")).await;
    let mut ws = gw.connect("/r").await;
    // 1005 may never be sent on the wire; craft it as a raw close frame.
    ws.send(Message::Frame(Frame::close(Some(CloseFrame {
        code: CloseCode::from(1005),
        reason: "".into(),
    }))))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await.0, 1002);
}

#[tokio::test]
async fn oversized_client_message_closes_1009() {
    let gw = Gw::start(
        "",
        &format!("[limits]\nmax_message_size = \"64KiB\"\nmax_frame_size = \"16KiB\"\n{ECHO_ROUTE}"),
    )
    .await;
    let mut ws = gw.connect("/echo").await;
    assert_eq!(roundtrip(&mut ws, "small").await, "small");
    // Too big as one frame.
    let _ = ws.send(Message::binary(vec![1u8; 20 * 1024])).await;
    assert_eq!(close_code(&mut ws).await.0, 1009);
    gw.wait_metric(r#"wsgate_errors_total{kind="message_too_big"}"#, 1.0).await;
    // Too big as a message made of small frames.
    let mut ws = gw.connect("/echo").await;
    for i in 0..6 {
        let op = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        if ws
            .send(Message::Frame(Frame::message(vec![2u8; 15 * 1024], op, i == 5)))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await.0, 1009);
    gw.wait_metric(r#"wsgate_closes_total{route="echo",code="1009",initiator="gateway"}"#, 2.0)
        .await;
}

#[tokio::test]
async fn oversized_upstream_message_closes_1009() {
    let up = upstream(Behaviour::SendBig(200 * 1024)).await;
    let gw = Gw::start(
        "",
        &format!(
            "[limits]\nmax_message_size = \"64KiB\"\nmax_frame_size = \"64KiB\"\n{}",
            route("r", "/r", &up.url(), "none")
        ),
    )
    .await;
    let mut ws = gw.connect("/r").await;
    assert_eq!(close_code(&mut ws).await.0, 1009);
    gw.wait_metric(r#"wsgate_errors_total{kind="message_too_big"}"#, 1.0).await;
    // The upstream was told too.
    assert_eq!(up.first_close().await.map(|c| c.0), Some(1009));
}

#[tokio::test]
async fn invalid_utf8_from_client_closes_1007() {
    let gw = Gw::echo().await;
    let mut ws = gw.connect("/echo").await;
    ws.send(Message::Frame(Frame::message(
        vec![0xffu8, 0xfe, 0x41],
        OpCode::Data(Data::Text),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await.0, 1007);
    gw.wait_metric(r#"wsgate_errors_total{kind="protocol"}"#, 1.0).await;
}

#[tokio::test]
async fn upstream_dying_mid_session_closes_1011() {
    let up = upstream(Behaviour::DieAfter(2)).await;
    let gw = Gw::start("", &route("r", "/r", &up.url(), "none")).await;
    let mut ws = gw.connect("/r").await;
    assert_eq!(roundtrip(&mut ws, "one").await, "one");
    ws.send(Message::text("two")).await.unwrap();
    assert_eq!(close_code(&mut ws).await.0, 1011);
    gw.wait_metric(r#"wsgate_errors_total{kind="upstream_reset"}"#, 1.0).await;
    gw.wait_metric(r#"wsgate_closes_total{route="r",code="1011",initiator="gateway"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn idle_session_closes_1001() {
    let gw = Gw::start("idle_timeout = \"300ms\"", ECHO_ROUTE).await;
    let mut ws = gw.connect("/echo").await;
    assert_eq!(roundtrip(&mut ws, "x").await, "x");
    let t0 = std::time::Instant::now();
    assert_eq!(close_code(&mut ws).await, (1001, "idle timeout".into()));
    assert!(t0.elapsed() >= Duration::from_millis(250), "{:?}", t0.elapsed());
    gw.wait_metric(r#"wsgate_errors_total{kind="idle_timeout"}"#, 1.0).await;
}

/// One alarm serves every deadline of a session: activity moves the idle deadline later
/// without moving the alarm, which rings at the old point, finds the session active and
/// is set again. A session kept busy past `idle_timeout` stays; silence after it still
/// closes it, one `idle_timeout` after the last frame.
#[tokio::test]
async fn activity_keeps_a_session_past_idle_timeout_and_silence_then_closes_it() {
    let gw = Gw::start("idle_timeout = \"300ms\"", ECHO_ROUTE).await;
    let mut ws = gw.connect("/echo").await;
    let busy_until = std::time::Instant::now() + Duration::from_millis(900);
    while std::time::Instant::now() < busy_until {
        assert_eq!(roundtrip(&mut ws, "busy").await, "busy");
        // Kept: frames 100 ms apart, three times within each idle_timeout.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = std::time::Instant::now();
    assert_eq!(close_code(&mut ws).await, (1001, "idle timeout".into()));
    let quiet = last.elapsed();
    assert!(quiet >= Duration::from_millis(150), "closed {quiet:?} after the last frame");
    assert!(quiet < Duration::from_secs(3), "closed {quiet:?} after the last frame");
}

#[tokio::test]
async fn client_that_stops_answering_pings_is_closed() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("ping_interval = \"200ms\"", &route("r", "/r", &up.url(), "none")).await;
    // A client that never reads never answers pings.
    let ws = gw.connect("/r").await;
    gw.wait_metric(r#"wsgate_errors_total{kind="ping_timeout"}"#, 1.0).await;
    drop(ws);
    // The upstream heard about it.
    assert_eq!(up.first_close().await.map(|c| c.0), Some(1001));
    // A client that reads (and so answers pings) stays connected.
    let mut ws = gw.connect("/r").await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(900);
    while tokio::time::Instant::now() < deadline {
        assert_eq!(roundtrip(&mut ws, "alive").await, "alive");
        // Kept: the point is a client that stays, reading, across several ping intervals.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.metric(r#"wsgate_errors_total{kind="ping_timeout"}"#).await, 1.0);
}

#[tokio::test]
async fn stalled_upstream_pushes_back_and_nothing_is_lost() {
    let up = upstream(Behaviour::Stall).await;
    let gw = Gw::start("", &route("r", "/r", &up.url(), "none")).await;
    let ws = gw.connect("/r").await;
    let (mut tx, mut rx) = ws.split();
    // Push 64 MiB while the upstream reads nothing: the sender must block long before that.
    let chunk = vec![9u8; 64 * 1024];
    let mut sent = 0usize;
    let blocked = loop {
        match tokio::time::timeout(Duration::from_millis(500), tx.send(Message::binary(chunk.clone()))).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => panic!("send failed: {e}"),
            Err(_) => break true,
        }
        if sent >= 1024 {
            break false;
        }
    };
    assert!(blocked, "sent {sent} x 64KiB without backpressure");
    assert!(sent < 256, "gateway buffered {sent} x 64KiB");
    // Let the upstream read: everything sent arrives, in order, and echoes come back.
    up.resume.notify_waiters();
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        while got < sent + 1 {
            match tokio::time::timeout(TIMEOUT, rx.next()).await.expect("echo stalled") {
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(b.len(), 64 * 1024);
                    got += 1;
                }
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        got
    });
    // The message that was blocked completes too.
    tokio::time::timeout(TIMEOUT, tx.flush()).await.unwrap().unwrap();
    assert_eq!(reader.await.unwrap(), sent + 1);
    assert_eq!(up.log.lock().unwrap().messages.len(), sent + 1);
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001_and_readyz_turns_503() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("shutdown_grace = \"5s\"", &route("r", "/r", &up.url(), "none")).await;
    assert_eq!(http_get(gw.admin, "/readyz").await.0, 200);
    let mut ws = gw.connect("/r").await;
    assert_eq!(roundtrip(&mut ws, "x").await, "x");
    let running = gw.running.as_ref().unwrap();
    running.shutdown();
    assert_eq!(close_code(&mut ws).await, (1001, "gateway shutting down".into()));
    assert_eq!(up.first_close().await.map(|c| c.0), Some(1001));
    gw.stop().await;
}

#[tokio::test]
async fn drain_spreads_the_1001_closes_over_the_grace() {
    let gw = Gw::start("shutdown_grace = \"2s\"", ECHO_ROUTE).await;
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(gw.connect("/echo").await);
    }
    let t0 = std::time::Instant::now();
    gw.running.as_ref().unwrap().shutdown();
    let mut times = Vec::new();
    for mut ws in sessions {
        times.push(tokio::spawn(async move {
            let code = close_code(&mut ws).await.0;
            (code, std::time::Instant::now())
        }));
    }
    let mut arrivals = Vec::new();
    for t in times {
        let (code, at) = t.await.unwrap();
        assert_eq!(code, 1001);
        arrivals.push(at.duration_since(t0));
    }
    arrivals.sort();
    assert!(arrivals[7] < Duration::from_millis(1500), "{arrivals:?}");
    assert!(
        arrivals[7] - arrivals[0] > Duration::from_millis(100),
        "all closed at once: {arrivals:?}"
    );
    gw.stop().await;
}

/// Frames larger than one read, messages split across many frames (with code points
/// split between fragments) and a burst of pipelined messages all arrive intact and in
/// order: the relay forwards frames as they complete, never whole messages.
#[tokio::test]
async fn large_fragmented_and_pipelined_frames_arrive_intact() {
    let gw = Gw::start(
        "",
        &format!("[limits]\nmax_frame_size = \"1MiB\"\nmax_message_size = \"2MiB\"\n{ECHO_ROUTE}"),
    )
    .await;
    let ws = gw.connect("/echo").await;
    let (mut tx, mut rx) = ws.split();
    let big: Vec<u8> = (0..250 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    // 900 KiB of text in 100 KiB fragments; "é" (2 bytes) and "€" (3 bytes) straddle the cuts.
    let text: String = "aé€".repeat(900 * 1024 / 6);
    // The writer runs on its own while this task reads the echoes back (a client that
    // stops reading would fill every buffer on the way and stall, as with any proxy).
    let writer = {
        let (big, text) = (big.clone(), text.clone());
        tokio::spawn(async move {
            tx.feed(Message::binary(big)).await.unwrap();
            let bytes = text.as_bytes();
            let cuts: Vec<usize> = (0..bytes.len()).step_by(100 * 1024 + 1).chain([bytes.len()]).collect();
            for (i, w) in cuts.windows(2).enumerate() {
                let op = if i == 0 {
                    OpCode::Data(Data::Text)
                } else {
                    OpCode::Data(Data::Continue)
                };
                let last = w[1] == bytes.len();
                tx.feed(Message::Frame(Frame::message(bytes[w[0]..w[1]].to_vec(), op, last)))
                    .await
                    .unwrap();
            }
            for i in 0..200u32 {
                tx.feed(Message::binary(i.to_be_bytes().to_vec())).await.unwrap();
            }
            tx.flush().await.unwrap();
            tx
        })
    };
    async fn next(rx: &mut futures_util::stream::SplitStream<wsgate::client::ClientStream>) -> Message {
        let m = tokio::time::timeout(TIMEOUT, rx.next()).await;
        m.expect("echo in time").expect("open").expect("no error")
    }
    eprintln!("STEP big");
    assert_eq!(next(&mut rx).await, Message::binary(big));
    eprintln!("STEP text");
    assert_eq!(next(&mut rx).await.into_text().unwrap().as_str(), text);
    for i in 0..200u32 {
        assert_eq!(next(&mut rx).await, Message::binary(i.to_be_bytes().to_vec()));
    }
    let tx = writer.await.unwrap();
    let mut ws = tx.reunite(rx).unwrap();
    assert_eq!(roundtrip(&mut ws, "still open").await, "still open");
}

/// Closing passes through the gateway: what the upstream sent before it saw a close
/// still reaches the client, ahead of the close, whether the client closed or broke
/// the protocol.
#[tokio::test]
async fn messages_in_flight_from_the_upstream_arrive_before_the_close() {
    let up = upstream(Behaviour::Echo).await;
    let gw = Gw::start("", &route("r", "/r", &up.url(), "none")).await;
    // A violation right behind two messages, in one write.
    let mut ws = gw.connect("/r").await;
    ws.feed(Message::text("one")).await.unwrap();
    ws.feed(Message::text("two")).await.unwrap();
    let mut bad = Frame::message("bad", OpCode::Data(Data::Text), true);
    bad.header_mut().rsv1 = true;
    ws.feed(Message::Frame(bad)).await.unwrap();
    ws.flush().await.unwrap();
    let mut got = vec![];
    let code = loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.expect("in time") {
            Some(Ok(Message::Text(t))) => got.push(t.to_string()),
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((got, code), (vec!["one".to_string(), "two".to_string()], Some(1002)));
    // A close right behind a message: the echo comes first, then the close reply.
    let mut ws = gw.connect("/r").await;
    ws.feed(Message::text("last words")).await.unwrap();
    ws.feed(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    ws.flush().await.unwrap();
    match tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap() {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "last words"),
        other => panic!("{other:?}"),
    }
    assert_eq!(close_code(&mut ws).await, (1000, "bye".into()));
}

/// A browser sends each message as one frame: with the frame limit at the message limit
/// (what `max_frame_size` defaults to), a 600 KiB single-frame message goes through, as
/// text and as binary, and comes back as one frame.
#[tokio::test]
async fn browser_sized_single_frame_messages_pass() {
    let gw = Gw::start(
        "",
        &format!("[limits]\nmax_frame_size = \"1MiB\"\nmax_message_size = \"1MiB\"\n{ECHO_ROUTE}"),
    )
    .await;
    let mut ws = gw.connect("/echo").await;
    let big: Vec<u8> = (0..600 * 1024).map(|i| (i * 13 % 251) as u8).collect();
    let text = "aé€𝄞".repeat(600 * 1024 / 10);
    for msg in [Message::binary(big), Message::text(text)] {
        ws.send(msg.clone()).await.unwrap();
        let echo = tokio::time::timeout(TIMEOUT, ws.next()).await.expect("echo in time");
        assert_eq!(echo.unwrap().unwrap(), msg);
    }
    assert_eq!(roundtrip(&mut ws, "still open").await, "still open");
}

/// `max_frame_size` bounds client frames only: an upstream's 256 KiB reply in one frame
/// reaches the client although client frames are limited to 64 KiB (the message limit
/// still bounds it).
#[tokio::test]
async fn upstream_frames_are_bounded_by_the_message_limit_only() {
    let gw = Gw::start(
        "",
        &format!("[limits]\nmax_frame_size = \"64KiB\"\nmax_message_size = \"1MiB\"\n{ECHO_ROUTE}"),
    )
    .await;
    let mut ws = gw.connect("/echo").await;
    // 256 KiB sent in 32 KiB frames; the echo answers with one 256 KiB frame.
    let big: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 253) as u8).collect();
    for (i, part) in big.chunks(32 * 1024).enumerate() {
        let op = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        let last = (i + 1) * 32 * 1024 == big.len();
        ws.send(Message::Frame(Frame::message(part.to_vec(), op, last))).await.unwrap();
    }
    let echo = tokio::time::timeout(TIMEOUT, ws.next()).await.expect("echo in time");
    assert_eq!(echo.unwrap().unwrap(), Message::binary(big));
    assert_eq!(roundtrip(&mut ws, "still open").await, "still open");
}

/// Invalid UTF-8 deep inside a large text frame closes 1007 while the frame streams.
#[tokio::test]
async fn invalid_utf8_inside_a_large_text_frame_closes_1007() {
    let gw = Gw::start(
        "",
        &format!("[limits]\nmax_frame_size = \"1MiB\"\nmax_message_size = \"1MiB\"\n{ECHO_ROUTE}"),
    )
    .await;
    let mut ws = gw.connect("/echo").await;
    let mut text = "é".repeat(300 * 1024).into_bytes();
    text[300 * 1024 + 1] = 0xFF;
    let _ = ws.send(Message::Frame(Frame::message(text, OpCode::Data(Data::Text), true))).await;
    assert_eq!(close_code(&mut ws).await.0, 1007);
    gw.wait_metric(r#"wsgate_closes_total{route="echo",code="1007",initiator="gateway"}"#, 1.0)
        .await;
}

/// Issue 28, item 4: frames sent before a `first_message` token pay toward
/// `message_rate` like every other frame: past the rate the gateway stops reading (no
/// pong for a ping it has not read), and a client that spends the token's time on pings
/// is closed with 1008 when `first_message_timeout` runs out.
#[tokio::test]
async fn frames_before_a_first_message_token_pay_toward_the_message_rate() {
    let rest = format!(
        "[limits]\nmessage_rate = \"1/s\"\nmessage_burst = 2\n{}",
        route("fm", "/fm", "builtin:echo", "jwt")
    );
    let sources = "audience = [\"wsgate\"]\ntoken_sources = [\"first_message\"]\nfirst_message_timeout = \"2s\"";
    let gw = Gw::start_with("", &rest, |t| t.replace("audience = [\"wsgate\"]", sources)).await;
    let (mut ws, _) = gw.try_connect("/fm", &gw.options(None)).await.unwrap();
    for i in 0..30u8 {
        ws.feed(Message::Ping(vec![i].into())).await.unwrap();
    }
    ws.feed(Message::text(gw.token("alice"))).await.unwrap();
    ws.flush().await.unwrap();
    let mut pongs = 0;
    let code = loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.expect("neither closed nor answered") {
            Some(Ok(Message::Pong(_))) => pongs += 1,
            Some(Ok(Message::Close(f))) => break f.map_or(1005, |f| u16::from(f.code)),
            Some(Ok(other)) => panic!("{other:?}"),
            Some(Err(_)) | None => break 1006,
        }
    };
    // The burst (2), then one a second for the 2 s the token may take; never 30.
    assert!(pongs <= 5, "{pongs} pongs before the token at 1/s");
    assert_eq!(code, 1008);
    gw.wait_metric(r#"wsgate_auth_failures_total{route="fm",reason="missing"}"#, 1.0)
        .await;
    // Within the rate, a ping and the token pass, and the session works.
    let (mut ws, _) = gw.try_connect("/fm", &gw.options(None)).await.unwrap();
    ws.send(Message::Ping(vec![1].into())).await.unwrap();
    ws.send(Message::text(gw.token("alice"))).await.unwrap();
    assert_eq!(roundtrip(&mut ws, "in rate").await, "in rate");
}

/// A reload that lands while a live session re-checks itself after the reload before it
/// (two reloads in quick succession) is not missed: the session checks again against the
/// newer configuration. (The generation to wait on next is taken before the check.)
#[tokio::test]
async fn a_reload_that_lands_during_a_recheck_makes_the_session_check_again() {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };
    use tokio_util::sync::CancellationToken;
    use wsgate::{error::CloseReason, relay};

    /// What a live session is checked by: the second reload tightens the policy, and it
    /// lands while the check for the first one runs.
    struct Reloads {
        current: Mutex<CancellationToken>,
        checks: AtomicUsize,
    }
    impl Reloads {
        fn reload(&self) {
            let old = std::mem::replace(&mut *self.current.lock().unwrap(), CancellationToken::new());
            old.cancel();
        }
    }
    impl relay::Policy for Reloads {
        fn generation(&self) -> CancellationToken {
            self.current.lock().unwrap().clone()
        }
        fn check(&self) -> Option<CloseReason> {
            if self.checks.fetch_add(1, Ordering::SeqCst) == 0 {
                self.reload(); // the second reload, while the first check reads the old config
                return None;
            }
            Some(CloseReason::AccessRevoked)
        }
    }

    let policy = Reloads {
        current: Mutex::new(CancellationToken::new()),
        checks: AtomicUsize::new(0),
    };
    let (_client, gw_client) = tokio::io::duplex(64 * 1024);
    let (gw_up, _up) = tokio::io::duplex(64 * 1024);
    let mut settings = relay::Settings::unthrottled(1 << 20);
    settings.close_timeout = Duration::from_millis(100);
    let metrics = wsgate::metrics::Metrics::new().session("t");
    let shutdown = CancellationToken::new();
    let mut control = relay::Control::new(&shutdown);
    control.policy = Some(&policy);
    let (mut c, mut u) = (relay::Endpoint::client(gw_client, &[]), relay::Endpoint::upstream(gw_up, &[]));
    let relay = relay::run(&mut c, &mut u, &mut settings, &metrics, &mut control);
    tokio::pin!(relay);
    // The relay starts and waits on the generation it was admitted under.
    assert!(tokio::time::timeout(Duration::from_millis(100), relay.as_mut()).await.is_err());
    policy.reload(); // the first reload
    let outcome = tokio::time::timeout(Duration::from_secs(3), relay)
        .await
        .expect("the session was not checked against the second reload");
    assert_eq!(outcome.code, 1008, "{outcome:?}");
    assert_eq!(policy.checks.load(Ordering::SeqCst), 2);
}
