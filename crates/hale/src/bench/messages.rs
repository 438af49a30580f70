//! `messages`: message throughput between two agents, with acks. A sender and a receiver
//! each hold a WebSocket session with hale (in this process); the sender keeps
//! `--message-window` sends in flight, the receiver acks each message as it arrives (acks
//! pipelined too). Every send and every ack is answered once fsync'd.

use super::{BenchArgs, machine, micros, summary_ms, temp_dir};
use anyhow::{Context, Result, bail};
use hale_client::{Agent, AgentOptions, Recipient};
use hale_server::ServerConfig;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The run fails if the receiver gets nothing for this long.
const PATIENCE: Duration = Duration::from_secs(30);

pub(super) async fn messages(args: &BenchArgs) -> Result<Value> {
    let (total, window) = (args.messages, args.message_window);
    if total == 0 || window == 0 {
        bail!("--messages and --message-window must be positive");
    }
    let dir = temp_dir(args)?;
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?);
    // The receiver acks as it goes, but a window of unacked messages is in its mailbox.
    let mut limits = config.limits.clone();
    limits.mailbox_max = limits.mailbox_max.max(total);
    config.set_limits(limits);
    let snapshot_every_events = config.snapshot_every_events;
    let server = hale_server::start(config).await?;
    let url = format!("ws://{}", server.local_addr());
    eprintln!("messages: {total} messages from one agent to another, {window} sends in flight, acks pipelined");
    let connect = async |name: &str| -> Result<Agent> {
        let agent = Agent::connect(&url, AgentOptions::new(name, "bench").token(server.admin_token())).await?;
        agent.resume().await?;
        Ok(agent)
    };
    let sender = connect("sender").await?;
    let receiver = connect("receiver").await?;
    let started = Instant::now();

    // The receiver: takes each message, notes how long it took to arrive, acks it.
    let acked = Arc::new(AtomicUsize::new(0));
    let receiving = {
        let (receiver, acked) = (receiver.clone(), acked.clone());
        tokio::spawn(async move {
            let mut arrival_us = Vec::with_capacity(total);
            let mut acks = tokio::task::JoinSet::new();
            while arrival_us.len() < total {
                let message = tokio::time::timeout(PATIENCE, receiver.next_message())
                    .await
                    .context("no message for 30 s")?
                    .context("the receiver's session ended")?;
                let sent_us = message.body["t"].as_u64().context("a bench message carries its send time")?;
                arrival_us.push(micros(started.elapsed()).saturating_sub(sent_us as u32));
                let (receiver, acked) = (receiver.clone(), acked.clone());
                acks.spawn(async move {
                    receiver.ack(message.seq).await?;
                    acked.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, hale_client::ClientError>(())
                });
                while let Some(done) = acks.try_join_next() {
                    done.context("an ack task panicked")??;
                }
            }
            while let Some(done) = acks.join_next().await {
                done.context("an ack task panicked")??;
            }
            Ok::<_, anyhow::Error>(arrival_us)
        })
    };

    // The sender: `window` loops, each one send at a time, so `window` are in flight.
    let next = Arc::new(AtomicUsize::new(0));
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..window {
        let (sender, next) = (sender.clone(), next.clone());
        senders.spawn(async move {
            let mut durable_us = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return Ok::<_, anyhow::Error>(durable_us);
                }
                let before = started.elapsed();
                let body = json!({ "n": n, "t": micros(before) });
                sender.send(Recipient::Agent("receiver".into()), Some("bench"), body).await?;
                durable_us.push(micros(started.elapsed() - before));
            }
        });
    }
    let mut send_us = Vec::with_capacity(total);
    while let Some(joined) = senders.join_next().await {
        send_us.extend(joined.context("a sender panicked")??);
    }
    let sent_in = started.elapsed();
    let mut arrival_us = receiving.await.context("the receiver panicked")??;
    let wall = started.elapsed();
    if acked.load(Ordering::Relaxed) != total {
        bail!("only {} of {total} messages were acked", acked.load(Ordering::Relaxed));
    }
    let engine = server.engine().clone();
    let (last_seq, unacked) = engine
        .read(|state| state.mail().mailbox("receiver").map(|m| (m.last_seq(), m.unacked_len())).unwrap_or_default())
        .await?;
    if last_seq != total as u64 || unacked != 0 {
        bail!("hale's mailbox disagrees: last seq {last_seq} (want {total}), {unacked} unacked (want 0)");
    }
    drop((sender, receiver));
    server.shutdown().await?;
    let seconds = wall.as_secs_f64();
    Ok(json!({
        "scenario": "messages",
        "messages": total,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "delivered_acked_per_s": (total as f64 / seconds).round(),
        "send_per_s": (total as f64 / sent_in.as_secs_f64()).round(),
        "send_to_receive": summary_ms(&mut arrival_us),
        "send_durable": summary_ms(&mut send_us),
        "settings": {
            "window": window,
            "body": "{\"n\": N, \"t\": MICROS}",
            "snapshot_every_events": snapshot_every_events,
            "durability": "SQLite WAL, synchronous=FULL: every send and every ack answered after fsync",
        },
        "how": format!(
            "hale runs in this process. Two hale_client::Agent sessions over WebSocket on loopback: `sender` keeps \
             {window} sends in flight (each answered once its MessageSent is durable), `receiver` takes each \
             `message` frame as it arrives and acks it (acks pipelined, each answered once durable). seconds and \
             delivered_acked_per_s: from the first send until the last ack was acknowledged. send_to_receive: \
             from just before a send until the receiver had the message (it is delivered only once durable). \
             send_durable: a send's round trip. Both agents and hale share this machine's cores. Checked at the \
             end: hale's mailbox holds {total} sequence numbers and none unacked."
        ),
        "machine": machine(),
    }))
}
