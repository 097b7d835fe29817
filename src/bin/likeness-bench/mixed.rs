//! Mixed load: search clients while writers upsert into the same collection, for a fixed
//! time, each figure beside the same load run alone in the same run.

use crate::daemon::{Daemon, Run};
use crate::{Ctx, stat};

pub async fn run(ctx: &Ctx, d: &Daemon) -> Result<(), String> {
    let (args, data) = (&ctx.args, &ctx.data);
    let secs = args.mixed_secs;
    let ingest = Some((args.writers, args.batch));
    let (mut search_alone, mut ingest_alone) = (Vec::new(), Vec::new());
    let (mut mixed_search, mut mixed_ingest) = (Vec::new(), Vec::new());
    let (mut busy_s, mut busy_i, mut busy_m) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..ctx.runs {
        let (s, _, cpu_s) = d
            .timed_load(data, &ctx.queries, Some(args.clients), None, secs)
            .await?;
        let (_, i, cpu_i) = d.timed_load(data, &ctx.queries, None, ingest, secs).await?;
        let (ms, mi, cpu_m) = d
            .timed_load(data, &ctx.queries, Some(args.clients), ingest, secs)
            .await?;
        let (s, i, ms, mi) = (
            s.expect("search"),
            i.expect("ingest"),
            ms.expect("search"),
            mi.expect("ingest"),
        );
        eprintln!(
            "mixed run {}/{}: search alone {:.0} QPS, ingest alone {:.0}/s, together {:.0} QPS + {:.0}/s",
            run + 1,
            ctx.runs,
            s.rate,
            i.rate,
            ms.rate,
            mi.rate
        );
        busy_s.push(cpu_s.daemon / secs);
        busy_i.push(cpu_i.daemon / secs);
        busy_m.push(cpu_m.daemon / secs);
        search_alone.push(s);
        ingest_alone.push(i);
        mixed_search.push(ms);
        mixed_ingest.push(mi);
    }
    let rate = |rs: &[Run]| stat(rs.iter().map(|r| r.rate).collect());
    let lat = |rs: &[Run]| {
        let mut l: Vec<_> = rs.iter().map(|r| (r.p50, r.p99)).collect();
        l.sort();
        let (p50, p99) = l[l.len() / 2];
        format!(
            "{:.2} / {:.2}",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        )
    };
    let (sa, ia, sm, im) = (
        rate(&search_alone),
        rate(&ingest_alone),
        rate(&mixed_search),
        rate(&mixed_ingest),
    );
    println!(
        "## Mixed load ({} x {}-d; {} search clients and {} writers re-upserting stored items in batches of {}, {secs} s per load)\n",
        data.n(),
        data.dim,
        args.clients,
        args.writers,
        args.batch
    );
    println!(
        "| load | search QPS | upserted vectors/s | Search p50 / p99, ms | Upsert p50 / p99, ms | daemon CPU, cores busy |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| search alone | {sa} | - | {} | - | {:.2} |",
        lat(&search_alone),
        stat(busy_s).median
    );
    println!(
        "| ingest alone | - | {ia} | - | {} | {:.2} |",
        lat(&ingest_alone),
        stat(busy_i).median
    );
    println!(
        "| both at once | {sm} ({:.2} of alone) | {im} ({:.2} of alone) | {} | {} | {:.2} |",
        sm.median / sa.median,
        im.median / ia.median,
        lat(&mixed_search),
        lat(&mixed_ingest),
        stat(busy_m).median
    );
    println!();
    Ok(())
}
