"""The audit database schema (DESIGN.md "Audit database"; documented in docs/database.md).

Bump `SCHEMA_VERSION` on any incompatible change; `AuditStore` refuses a file written with
another version instead of guessing.
"""

from __future__ import annotations

SCHEMA_VERSION = 4  # 2: generations.clip_score, the quality table and view; 3: screens.score_name
#                      and screens.params_json; 4: prompts.target_key, matches.reproduced

TABLES: list[str] = [
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS runs (
        id INTEGER PRIMARY KEY,
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP,
        status TEXT NOT NULL,              -- running | finished | failed
        model TEXT NOT NULL,
        model_hash TEXT,
        index_path TEXT,
        index_hash TEXT,
        plan_json TEXT NOT NULL,           -- the full normalised plan
        plan_hash TEXT NOT NULL,
        settings_json TEXT,                -- resolved settings (scale, steps, thresholds...)
        versions_json TEXT,                -- package versions
        device TEXT,
        seeds_json TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS prompts (
        id INTEGER PRIMARY KEY,
        text TEXT NOT NULL UNIQUE,
        sources_json TEXT NOT NULL,        -- JSON list of prompt-list files it came from
        label TEXT,
        target_key TEXT                    -- the training item it is known to reproduce
    )""",
    """CREATE TABLE IF NOT EXISTS generations (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL,
        prompt_id INTEGER NOT NULL,
        method TEXT NOT NULL,              -- method spec as in the plan, e.g. "amg:spe,dup"
        seed INTEGER NOT NULL,
        guidance_scale DOUBLE,
        steps INTEGER,
        image_path TEXT NOT NULL,          -- relative to the database's directory
        wall_seconds DOUBLE,               -- per image (batch wall time / batch size)
        unet_calls DOUBLE,                 -- UNet evaluations per image
        final_prompt TEXT,                 -- after perturbation (rna, rta, cwr)
        alignment DOUBLE,                  -- 1/0 digit agreement (canary)
        clip_score DOUBLE,                 -- 100 cos(image, prompt), METHODS 1.3 (clip_model)
        extra_json TEXT,
        UNIQUE (run_id, prompt_id, method, seed)
    )""",
    """CREATE TABLE IF NOT EXISTS matches (
        generation_id INTEGER NOT NULL,
        criterion TEXT NOT NULL,
        score DOUBLE NOT NULL,             -- the criterion's own score (cosine, nL2, ...)
        similarity DOUBLE NOT NULL,        -- higher = more similar (nL2 -> -nL2)
        higher_is_more_similar BOOLEAN NOT NULL,
        neighbour_row BIGINT,
        neighbour_key TEXT,
        neighbour_caption TEXT,
        dup_count INTEGER,
        is_copy BOOLEAN NOT NULL,          -- fixed threshold (METHODS 1)
        is_copy_calibrated BOOLEAN,        -- index-calibrated threshold (NULL: no calibration)
        threshold DOUBLE,
        calibrated_threshold DOUBLE,
        extra_json TEXT,
        reproduced BOOLEAN,                -- the prompt's target nearest and the fixed cut
        --                                    passed (NULL: no target; docs/criteria.md)
        PRIMARY KEY (generation_id, criterion)
    )""",
    """CREATE TABLE IF NOT EXISTS screens (
        run_id INTEGER NOT NULL,
        prompt_id INTEGER NOT NULL,
        score DOUBLE NOT NULL,             -- the screening score (METHODS 2, 2.1)
        steps INTEGER NOT NULL,
        seeds INTEGER NOT NULL,
        threshold DOUBLE,
        flagged BOOLEAN,
        score_name TEXT,                   -- e.g. wen, anisotropy
        params_json TEXT,                  -- its paper, parameters and notes (where they come from)
        PRIMARY KEY (run_id, prompt_id, steps, seeds)
    )""",
    """CREATE TABLE IF NOT EXISTS steps (
        generation_id INTEGER NOT NULL,
        step INTEGER NOT NULL,
        t DOUBLE,
        u DOUBLE,
        guidance_norm DOUBLE,              -- || eps_hat - e_u ||_2 of the sample (guidance applied)
        sigma_t DOUBLE,                    -- AMG similarity of x0_hat
        lambda_t DOUBLE,                    -- AMG threshold at this step
        active_json TEXT,                  -- JSON list of active guidances
        extra_json TEXT,                   -- every other per-step trace value
        PRIMARY KEY (generation_id, step)
    )""",
    """CREATE TABLE IF NOT EXISTS quality (
        run_id INTEGER NOT NULL,
        method TEXT NOT NULL,
        features TEXT NOT NULL,            -- the feature space, e.g. fid-inception-v3
        dim INTEGER,
        n INTEGER NOT NULL,                -- generated images of the method
        n_reference INTEGER NOT NULL,      -- training images in the reference sample
        reference_seed INTEGER,
        kid DOUBLE,                        -- unbiased MMD^2, mean over subsets
        kid_std DOUBLE,                    -- its std over the subsets
        kid_subsets INTEGER,
        kid_subset_size INTEGER,
        fd DOUBLE,                         -- Frechet distance (biased at small n)
        extra_json TEXT,
        PRIMARY KEY (run_id, method, features)
    )""",
    """CREATE TABLE IF NOT EXISTS units (
        run_id INTEGER NOT NULL,
        unit TEXT NOT NULL,                -- e.g. "gen|cfg|3" or "screen|0"
        finished_at TIMESTAMP NOT NULL,
        PRIMARY KEY (run_id, unit)
    )""",
]

TABLE_NAMES = ("meta", "runs", "prompts", "generations", "matches", "screens", "steps",
               "units", "quality")

VIEWS: list[str] = [
    # one row per run x prompt x method x criterion
    """CREATE OR REPLACE VIEW prompt_method AS
    SELECT g.run_id, g.prompt_id, p.text AS prompt, p.label, g.method, m.criterion,
           count(*) AS n,
           sum(CASE WHEN m.is_copy THEN 1 ELSE 0 END) AS copies_fixed,
           sum(CASE WHEN m.is_copy_calibrated THEN 1 ELSE 0 END) AS copies_calibrated,
           avg(CASE WHEN m.is_copy THEN 1.0 ELSE 0.0 END) AS copy_rate_fixed,
           avg(CASE WHEN m.is_copy_calibrated THEN 1.0 ELSE 0.0 END)
               FILTER (WHERE m.is_copy_calibrated IS NOT NULL) AS copy_rate_calibrated,
           max(m.similarity) AS max_similarity,
           CASE WHEN bool_and(m.higher_is_more_similar) THEN max(m.score)
                ELSE min(m.score) END AS best_score,
           arg_max(m.neighbour_key, m.similarity) AS top_neighbour_key,
           arg_max(m.dup_count, m.similarity) AS top_dup_count,
           avg(g.alignment) AS alignment,
           avg(CASE WHEN m.reproduced THEN 1.0 ELSE 0.0 END)
               FILTER (WHERE m.reproduced IS NOT NULL) AS reproduction_rate
    FROM generations g
    JOIN prompts p ON p.id = g.prompt_id
    JOIN matches m ON m.generation_id = g.id
    GROUP BY ALL""",
    # cost per run x method (independent of criteria)
    """CREATE OR REPLACE VIEW method_cost AS
    WITH c AS (
        SELECT run_id, method, count(*) AS generations, avg(wall_seconds) AS wall_per_image,
               avg(unet_calls) AS unet_calls_per_image, avg(alignment) AS alignment,
               avg(clip_score) AS clip_score
        FROM generations GROUP BY run_id, method
    )
    SELECT c.*,
           c.unet_calls_per_image / nullif(b.unet_calls_per_image, 0) AS unet_ratio_to_cfg,
           c.wall_per_image / nullif(b.wall_per_image, 0) AS wall_ratio_to_cfg,
           c.alignment / nullif(b.alignment, 0) AS alignment_ratio_to_cfg,
           c.clip_score / nullif(b.clip_score, 0) AS clip_score_ratio_to_cfg
    FROM c LEFT JOIN c AS b ON b.run_id = c.run_id AND b.method = 'cfg'""",
    # quality per run x method x feature space, with cfg's figures beside it
    """CREATE OR REPLACE VIEW method_quality AS
    SELECT q.run_id, q.method, q.features, q.dim, q.n, q.n_reference, q.reference_seed,
           q.kid, q.kid_std, q.kid_subsets, q.kid_subset_size, q.fd,
           b.kid AS cfg_kid, b.fd AS cfg_fd,
           q.fd / nullif(b.fd, 0) AS fd_ratio_to_cfg,
           q.kid - b.kid AS kid_minus_cfg
    FROM quality q LEFT JOIN quality b
         ON b.run_id = q.run_id AND b.features = q.features AND b.method = 'cfg'""",
    # one row per run x method x criterion: what the report's summary and the gate read
    """CREATE OR REPLACE VIEW method_summary AS
    WITH s AS (
        SELECT g.run_id, g.method, m.criterion,
               count(*) AS n,
               avg(CASE WHEN m.is_copy THEN 1.0 ELSE 0.0 END) AS copy_rate_fixed,
               avg(CASE WHEN m.is_copy_calibrated THEN 1.0 ELSE 0.0 END)
                   FILTER (WHERE m.is_copy_calibrated IS NOT NULL) AS copy_rate_calibrated,
               avg(CASE WHEN m.reproduced THEN 1.0 ELSE 0.0 END)
                   FILTER (WHERE m.reproduced IS NOT NULL) AS reproduction_rate,
               quantile_cont(m.similarity, 0.95) AS p95_similarity,
               max(m.similarity) AS max_similarity,
               bool_and(m.higher_is_more_similar) AS higher_is_more_similar,
               any_value(m.threshold) AS threshold,
               any_value(m.calibrated_threshold) AS calibrated_threshold
        FROM generations g JOIN matches m ON m.generation_id = g.id
        GROUP BY g.run_id, g.method, m.criterion
    )
    SELECT s.*, c.alignment, c.wall_per_image, c.unet_calls_per_image,
           c.unet_ratio_to_cfg, c.wall_ratio_to_cfg, c.clip_score,
           c.alignment_ratio_to_cfg, c.clip_score_ratio_to_cfg
    FROM s JOIN method_cost c ON c.run_id = s.run_id AND c.method = s.method""",
]
