#################################################################################
#                          SiT and SiT+REPA Configs                             #
#################################################################################
# SiT (Ma et al. 2024) is DiT's network trained as a flow: the same blocks and keys (REFERENCE 8), t in [0, 1]
# fed to the same sinusoidal embedder, and the output read as a velocity. The released SiT-XL-2-256.pt still has
# DiT's learned-sigma head (8 channels); SiT's forward keeps the first half and ignores the rest. REPA (Yu et al.
# 2025) drops that head (4 channels) and adds projectors on the hidden states after block `encoder_depth`;
# forward then returns (output, [projected tokens]) as REPA's models/sit.py does (REFERENCE 9).

class SiT(DiT):
    """DiT's backbone as SiT and REPA use it: velocity output, DiT's learned-sigma channels dropped."""

    def forward(self, x, t, y):
        """
        x: (N, C, H, W) latents, t: (N,) float times in [0, 1], y: (N,) labels.
        Returns (N, C, H, W), or ((N, C, H, W), [(N, T, z_dim), ...]) with REPA's projectors.
        """
        out = super().forward(x, t, y)
        if not self.learn_sigma:
            return out
        # The official SiT forward: x, _ = x.chunk(2, dim=1). The second half was never trained for anything.
        if isinstance(out, tuple):
            return out[0].chunk(2, dim=1)[0], out[1]
        return out.chunk(2, dim=1)[0]


def _sit(learn_sigma=None, **kwargs):
    """SiT with learned-sigma channels unless it is REPA's model (projectors given), which has none."""
    if learn_sigma is None:
        learn_sigma = kwargs.get("encoder_depth") is None and not kwargs.get("z_dims")
    return SiT(learn_sigma=learn_sigma, **kwargs)


def SiT_XL_2(**kwargs): return _sit(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)
def SiT_XL_4(**kwargs): return _sit(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)
def SiT_XL_8(**kwargs): return _sit(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)
def SiT_L_2(**kwargs): return _sit(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)
def SiT_L_4(**kwargs): return _sit(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)
def SiT_L_8(**kwargs): return _sit(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)
def SiT_B_2(**kwargs): return _sit(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)
def SiT_B_4(**kwargs): return _sit(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)
def SiT_B_8(**kwargs): return _sit(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)
def SiT_S_2(**kwargs): return _sit(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)
def SiT_S_4(**kwargs): return _sit(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)
def SiT_S_8(**kwargs): return _sit(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)
# Not in the paper: DiT-T/2's CPU-sized twin for the tiny preset and tests.
def SiT_T_2(**kwargs): return _sit(depth=4, hidden_size=128, patch_size=2, num_heads=4, **kwargs)


SiT_models = {
    "SiT-XL/2": SiT_XL_2, "SiT-XL/4": SiT_XL_4, "SiT-XL/8": SiT_XL_8,
    "SiT-L/2": SiT_L_2, "SiT-L/4": SiT_L_4, "SiT-L/8": SiT_L_8,
    "SiT-B/2": SiT_B_2, "SiT-B/4": SiT_B_4, "SiT-B/8": SiT_B_8,
    "SiT-S/2": SiT_S_2, "SiT-S/4": SiT_S_4, "SiT-S/8": SiT_S_8,
    "SiT-T/2": SiT_T_2,
}


def build_sit(name, **kwargs):
    """SiT_models[name](**kwargs) with a clear error for an unknown name."""
    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; valid SiT models: {', '.join(SiT_models)}")
    return SiT_models[name](**kwargs)


def sit_from_state_dict(state_dict, encoder_depth=None, **kwargs):
    """
    Build the SiT or REPA model a state dict was saved from and load it (keys checked, errors name them).
    Learned sigma is read off the output width, REPA's projectors off `projectors.*`; REPA's encoder_depth is not
    stored in its checkpoints: None means 8 (the released SiT-XL/2 + REPA), or the depth of a shallower model
    (sampling never uses the projectors, so it only has to be valid).
    """
    cfg = dit_config_from_state_dict(state_dict)
    encoder_depth = min(8, cfg["depth"]) if encoder_depth is None else encoder_depth
    z_dims, proj_dim, i = [], 2048, 0
    while f"projectors.{i}.4.weight" in state_dict:
        z_dims.append(state_dict[f"projectors.{i}.4.weight"].shape[0])
        proj_dim = state_dict[f"projectors.{i}.0.weight"].shape[0]
        i += 1
    repa = dict(encoder_depth=encoder_depth, z_dims=z_dims, projector_dim=proj_dim) if z_dims else {}
    # The head count leaves no trace in the weights: take the SiT_models config of this width (64-dim heads).
    heads = kwargs.pop("num_heads", None) or {1152: 16, 1024: 16, 768: 12, 384: 6, 128: 4}.get(cfg["hidden_size"])
    if heads is None:
        raise ValueError(f"hidden size {cfg['hidden_size']} is no SiT_models config: pass num_heads")
    model = SiT(input_size=cfg["input_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
                hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=heads, num_classes=cfg["num_classes"],
                learn_sigma=cfg["out_channels"] == 2 * cfg["in_channels"], **repa, **kwargs)
    return load_dit_weights(model, state_dict)


#################################################################################
#                Interpolant Transport (SiT and REPA training/sampling)         #
#################################################################################
# Stochastic interpolants (Albergo & Vanden-Eijnden 2023; SiT Sec. 2): x_t = alpha_t x1 + sigma_t x0 joins noise
# x0 ~ N(0, I) and data x1. A network learns the velocity u_t = d x_t / dt = alpha'_t x1 + sigma'_t x0 (or the score
# or the noise), and new samples come from integrating the probability-flow ODE dx/dt = v(x, t), or an SDE with the
# same marginals, from noise to data. Everything below is SiT's transport/ package (paths, losses, ODE/SDE
# samplers) and REPA's samplers.py written out once.
#
# Two clocks. SiT puts data at t = 1 (x_t = t x1 + (1 - t) x0, target x1 - x0). REPA puts data at t = 0
# (x_t = (1 - t) x + t eps, target eps - x). Same path, reversed time: t_REPA = 1 - t_SiT and the velocity flips
# sign. A Transport has a `clock` ("sit" or "repa"): the model always sees times of its own clock, training
# targets are derivatives in that clock, and samplers integrate in it (REPA from 1 down to 0), so each family's
# official checkpoints sample exactly as their own code does. Paths are written in SiT time `s` below.

class Transport:
    """
    An interpolant path plus what is trained and how samples are drawn.
    path_type: "Linear" (alpha = s, sigma = 1 - s), "GVP" (sin/cos; REPA's "cosine") or "VP" (score-SDE's VP path).
    prediction: "velocity" (SiT/REPA default), "score" or "noise"; loss_weight None, "velocity" or "likelihood"
    (score/noise only). time_sampling: "uniform" (SiT, REPA) or "logit_normal" (REPA's "lognormal": noise-to-signal
    ratio sigma/alpha ~ LogNormal(0, 1), which for the Linear path is logit(t) ~ N(0, 1)). clock: "sit" or "repa".
    """

    def __init__(self, path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None,
                 time_sampling="uniform", clock="sit"):
        for name, value, valid in [("path_type", path_type, ("Linear", "GVP", "VP")),
                                   ("prediction", prediction, ("velocity", "score", "noise")),
                                   ("loss_weight", loss_weight, (None, "velocity", "likelihood")),
                                   ("time_sampling", time_sampling, ("uniform", "logit_normal")),
                                   ("clock", clock, ("sit", "repa"))]:
            if value not in valid:
                raise ValueError(f"{name}={value!r}; choose from {valid}")
        if time_sampling == "logit_normal" and path_type == "VP":
            raise ValueError("logit_normal time sampling is defined for the Linear and GVP paths (as REPA's)")
        self.path_type, self.prediction, self.loss_weight = path_type, prediction, loss_weight
        self.time_sampling, self.clock = time_sampling, clock
        self.beta_min, self.beta_max = 0.1, 20.0  # VP path constants (SiT's VPCPlan; score-SDE's beta(t) range)
        # Endpoint offsets (SiT create_transport): velocity on Linear/GVP is finite everywhere, so [0, 1] is used in
        # full; score and noise blow up at an end (a 1/sigma or 1/alpha), and on the VP path sigma' is infinite at
        # the data (sigma = 0).
        if path_type == "VP":
            default_train, default_sample = 1e-5, 1e-3
        elif prediction != "velocity":
            default_train, default_sample = 1e-3, 1e-3
        else:
            default_train, default_sample = 0.0, 0.0
        self.train_eps = default_train if train_eps is None else train_eps
        self.sample_eps = default_sample if sample_eps is None else sample_eps
        self.ds_dt = 1.0 if clock == "sit" else -1.0  # d(SiT time) / d(this clock's time)
        self.nfe = 0  # network evaluations of the last sampler call

    # ---- the path ----
    def to_sit_time(self, t):
        """This clock's time -> SiT time s (data at s = 1). The map is its own inverse."""
        return t if self.clock == "sit" else 1 - t

    def _path(self, s):
        """(alpha, d alpha / ds, sigma, d sigma / ds) at SiT times s (a tensor)."""
        if self.path_type == "Linear":  # straight line between noise and data (rectified flow)
            return s, torch.ones_like(s), 1 - s, -torch.ones_like(s)
        if self.path_type == "GVP":  # alpha^2 + sigma^2 = 1 with constant speed on the quarter circle
            h = math.pi / 2
            return torch.sin(h * s), h * torch.cos(h * s), torch.cos(h * s), -h * torch.sin(h * s)
        # VP: the variance-preserving diffusion (DDPM/score SDE) with beta(r) linear from beta_min to beta_max in
        # diffusion time r = 1 - s: log alpha = -1/4 r^2 (beta_max - beta_min) - 1/2 r beta_min, sigma^2 = 1 - alpha^2.
        r = 1 - s
        log_alpha = -0.25 * r ** 2 * (self.beta_max - self.beta_min) - 0.5 * r * self.beta_min
        d_log_alpha = 0.5 * r * (self.beta_max - self.beta_min) + 0.5 * self.beta_min  # = beta(r) / 2
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(1 - alpha ** 2)
        return alpha, alpha * d_log_alpha, sigma, -alpha ** 2 * d_log_alpha / sigma  # sigma' = -alpha alpha' / sigma

    def coefficients(self, t):
        """(alpha_t, alpha'_t, sigma_t, sigma'_t) at times t of this clock, derivatives taken in this clock."""
        alpha, d_alpha, sigma, d_sigma = self._path(self.to_sit_time(t))
        return alpha, self.ds_dt * d_alpha, sigma, self.ds_dt * d_sigma

    def drift_var(self, t):
        """
        lambda_t = (alpha'/alpha) sigma^2 - sigma sigma' (SiT time, >= 0): velocity = (alpha'/alpha) x + lambda score,
        which follows from Tweedie's E[x1 | x] = (x + sigma^2 score) / alpha and E[x0 | x] = -sigma score.
        """
        alpha, d_alpha, sigma, d_sigma = self._path(self.to_sit_time(t))
        return d_alpha / alpha * sigma ** 2 - sigma * d_sigma

    def interval(self, sde=False, train=False, diffusion_form="sigma", last_step_size=0.0):
        """
        (t_noise, t_data) in this clock: the range training draws t from and samplers integrate over
        (SiT's check_interval). With an SDE's last step the integration stops last_step_size short of the data.
        """
        eps = self.train_eps if train else self.sample_eps
        d_noise, d_data = 0.0, 0.0  # how far each end stays from pure noise and from the data (SiT time units)
        end = last_step_size if (sde and last_step_size > 0) else eps
        if self.path_type == "VP":
            d_data = end
        elif self.prediction != "velocity" or sde:
            d_noise = eps if (sde and diffusion_form == "SBDM") or self.prediction != "velocity" else 0.0
            d_data = end
        # Written per clock (not via to_sit_time) so REPA's ends are exactly its 1 and 0.04.
        return (d_noise, 1 - d_data) if self.clock == "sit" else (1 - d_noise, d_data)

    # ---- training ----
    def sample_time(self, n, device, train=True):
        """(n,) training times in this clock (uniform on the training interval, or REPA's log-normal)."""
        if self.time_sampling == "uniform":
            lo, hi = sorted(self.interval(train=train))
            return torch.rand(n, device=device) * (hi - lo) + lo
        ratio = torch.randn(n, device=device).exp()  # sigma_t / alpha_t ~ LogNormal(0, 1) (EDM, REPA loss.py)
        s = 1 / (1 + ratio) if self.path_type == "Linear" else torch.atan(1 / ratio) * (2 / math.pi)
        return self.to_sit_time(s)

    def training_losses(self, model, x1, model_kwargs=None):
        """
        SiT's objective for data x1 (N, C, H, W): dict with "loss" (N,), "t" (N,), "pred" and, for REPA's model,
        "zs" (its projected hidden states). Velocity: ||v_theta(x_t, t) - u_t||^2; noise/score with SiT's weights.
        """
        t = self.sample_time(x1.shape[0], x1.device)
        x0 = torch.randn_like(x1)
        tb = t.view(-1, *[1] * (x1.ndim - 1)).to(x1.dtype)
        alpha, d_alpha, sigma, d_sigma = self.coefficients(tb)
        xt = alpha * x1 + sigma * x0   # a point on the path
        ut = d_alpha * x1 + d_sigma * x0  # its velocity: SiT x1 - x0, REPA eps - x (clocks run opposite ways)
        out = model(xt, t, **(model_kwargs or {}))
        zs = None
        if isinstance(out, tuple):  # REPA: (output, projected hidden states)
            out, zs = out
        if self.prediction == "velocity":
            loss = mean_flat((out - ut) ** 2)
        else:
            lam = self.drift_var(tb)
            weight = {None: 1.0, "velocity": (lam / sigma) ** 2, "likelihood": lam / sigma ** 2}[self.loss_weight]
            if self.prediction == "noise":  # out ~ x0
                loss = mean_flat(weight * (out - x0) ** 2)
            else:                           # out ~ score = -x0 / sigma
                loss = mean_flat(weight * (out * sigma + x0) ** 2)
        return {"loss": loss, "t": t, "pred": out, "zs": zs}

    # ---- from network outputs to velocity and score ----
    def velocity_and_score(self, out, x, t, need_score=True):
        """Velocity dx/dt (this clock) and score grad log p_t(x) from the network output at (x, t); t broadcast."""
        alpha, d_alpha, sigma, d_sigma = self.coefficients(t)
        if self.prediction == "velocity":
            v = out
            if not need_score:
                return v, None
            # Invert v = (a'/a) x + lambda s in the form SiT uses (multiplied through by a/a'): finite at alpha = 0,
            # where the sampler starts (s = -x there).
            rev = alpha / d_alpha
            return v, (rev * v - x) / (sigma ** 2 - rev * d_sigma * sigma)
        score = out if self.prediction == "score" else -out / sigma
        return d_alpha / alpha * (x + sigma ** 2 * score) - sigma * d_sigma * score, score

    def _diffusion(self, t, form, norm):
        """SDE diffusion coefficient w(t) (SiT's compute_diffusion), as a function of SiT time."""
        s = self.to_sit_time(t)
        if form == "constant":
            return norm * torch.ones_like(s)
        if form == "SBDM":
            return norm * self.drift_var(t)
        if form == "sigma":
            return norm * self._path(s)[2]
        if form == "linear":
            return norm * (1 - s)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * s) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * s) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; choose constant, SBDM, sigma, linear, decreasing, "
                         f"increasing-decreasing")

    def _model_fn(self, model, y, model_dtype, cfg_scale, cfg_channels, null_class, guidance_low, guidance_high):
        """
        out(x, t, t_guide): network output at state x (float64) and time t, with classifier-free guidance when
        cfg_scale > 1 and guidance_low <= t_guide <= guidance_high (REPA's guidance interval, in this clock).
        Guidance acts on the first cfg_channels channels (3 in SiT/DiT, a leftover kept for their numbers; None =
        all, as REPA); the others take the conditional output, as SiT's forward_with_cfg leaves them.
        """
        def fn(x, t, t_guide):
            n = x.shape[0]
            tt = torch.full((n,), float(t), dtype=torch.float64, device=x.device)
            guide = cfg_scale > 1.0 and guidance_low <= float(t_guide) <= guidance_high
            self.nfe += 1
            if not guide:
                out = model(x.to(model_dtype), tt.to(model_dtype), y)
                return (out[0] if isinstance(out, tuple) else out).to(torch.float64)
            y_null = torch.full_like(y, null_class)
            out = model(torch.cat([x, x]).to(model_dtype), torch.cat([tt, tt]).to(model_dtype), torch.cat([y, y_null]))
            cond, uncond = (out[0] if isinstance(out, tuple) else out).to(torch.float64).chunk(2)
            c = cond.shape[1] if cfg_channels is None else cfg_channels
            guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
            return torch.cat([guided, cond[:, c:]], dim=1)
        return fn

    # ---- samplers ----
    @torch.no_grad()
    def sample_ode(self, model, z, y, sampler="dopri5", steps=50, atol=1e-6, rtol=1e-3, cfg_scale=1.0,
                   cfg_channels=None, guidance_low=0.0, guidance_high=1.0, null_class=1000, heun_last_step=None):
        """
        Probability-flow ODE from noise z (N, C, H, W) to data. "euler" / "heun": `steps` equal steps (REPA's
        euler_sampler; by default Heun's corrector is skipped on the last step in the REPA clock as REPA does, and
        kept in the SiT clock). "dopri5": adaptive Dormand-Prince 5(4) with SiT's tolerances (torchdiffeq's
        default solver in SiT). State in float64 as REPA; the model sees z's dtype.
        """
        self.nfe = 0
        fn = self._model_fn(model, y, z.dtype, cfg_scale, cfg_channels, null_class, guidance_low, guidance_high)
        t0, t1 = self.interval(sde=False)
        x = z.to(torch.float64)

        def velocity(x, t, t_guide=None):
            tb = torch.full((1,) * x.ndim, float(t), dtype=torch.float64, device=x.device)
            return self.velocity_and_score(fn(x, t, t if t_guide is None else t_guide), x, tb, need_score=False)[0]

        if sampler == "dopri5":
            x = dopri5(velocity, x, t0, t1, atol=atol, rtol=rtol)
        elif sampler in ("euler", "heun"):
            if heun_last_step is None:
                heun_last_step = self.clock == "sit"
            ts = torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()
            for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
                d_cur = velocity(x, t_cur)
                x_next = x + (t_next - t_cur) * d_cur
                if sampler == "heun" and (i < steps - 1 or heun_last_step):
                    # Heun's corrector: the trapezoid rule with the slope at the Euler guess; guidance is decided
                    # by t_cur for both evaluations (REPA).
                    d_next = velocity(x_next, t_next, t_guide=t_cur)
                    x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
                x = x_next
        else:
            raise ValueError(f"unknown ODE sampler {sampler!r}; choose euler, heun or dopri5")
        return x.to(z.dtype)

    @torch.no_grad()
    def sample_sde(self, model, z, y, steps=250, diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean",
                   last_step_size=0.04, cfg_scale=1.0, cfg_channels=None, guidance_low=0.0, guidance_high=1.0,
                   null_class=1000, generator=None):
        """
        Euler-Maruyama on the reverse SDE dx = [v + c w(t) score] dt + sqrt(2 w(t)) dW that has the ODE's
        marginals (SiT Sec. 2.3; c = +1 in the SiT clock, -1 in REPA's, where the same equation is run backwards).
        `steps` grid points from pure noise to last_step_size short of the data (SiT's linspace(0, 0.96, 250),
        REPA's linspace(1, 0.04, 250)), steps - 1 noisy steps, then one noise-free last step:
        "Mean" (x + drift * dt: SiT's default and REPA's), "Euler" (x + v dt), "Tweedie" (E[x1 | x]) or None.
        With w = sigma_t (SiT's CLI default, "sigma") this is exactly REPA's euler_maruyama_sampler.
        """
        self.nfe = 0
        if last_step is None:
            last_step_size = 0.0
        fn = self._model_fn(model, y, z.dtype, cfg_scale, cfg_channels, null_class, guidance_low, guidance_high)
        t0, t1 = self.interval(sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
        ts = torch.linspace(t0, t1, steps, dtype=torch.float64).tolist()
        x = z.to(torch.float64)
        if not math.isfinite(float(self._diffusion(torch.tensor(t0, dtype=torch.float64), diffusion_form, 1.0))):
            # SiT starts its SDE at sample_eps, which is 0 for velocity models: SBDM's lambda_t = 1/t there.
            raise ValueError(f"diffusion form {diffusion_form!r} is infinite at the start t={t0}: set sample_eps > 0")

        def drift_and_parts(x, t):
            tb = torch.full((1,) * x.ndim, t, dtype=torch.float64, device=x.device)
            v, score = self.velocity_and_score(fn(x, t, t), x, tb)
            w = self._diffusion(tb, diffusion_form, diffusion_norm)
            return v + self.ds_dt * w * score, v, score, w, tb

        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t_cur
            drift, _, _, w, _ = drift_and_parts(x, t_cur)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
            x = x + drift * dt + torch.sqrt(2 * w) * math.sqrt(abs(dt)) * noise
        if last_step is None:
            return x.to(z.dtype)
        drift, v, score, _, tb = drift_and_parts(x, ts[-1])
        dt = self.ds_dt * last_step_size  # toward the data
        if last_step == "Mean":
            x = x + drift * dt
        elif last_step == "Euler":
            x = x + v * dt
        elif last_step == "Tweedie":
            alpha, _, sigma, _ = self.coefficients(tb)
            x = (x + sigma ** 2 * score) / alpha
        else:
            raise ValueError(f"unknown last step {last_step!r}; choose Mean, Euler, Tweedie or None")
        return x.to(z.dtype)


def dopri5(f, x, t0, t1, atol=1e-6, rtol=1e-3, safety=0.9, ifactor=10.0, dfactor=0.2, max_steps=100_000):
    """
    Integrate dx/dt = f(x, t) from t0 to t1 (either direction) with the Dormand-Prince 5(4) pair; returns x(t1).
    Step control as torchdiffeq's dopri5 (which SiT calls): error measured by the RMS over the whole tensor (the
    whole batch shares the steps) of err / (atol + rtol max(|x|, |x_new|)), step *= clamp(safety err^-1/5, dfactor,
    ifactor) (never shrunk after an accepted step), first step by Hairer, Norsett & Wanner's rule; the last stage is
    reused (FSAL). One difference: the last step is shortened to land on t1, where torchdiffeq steps past t1 (the
    network then sees t > 1) and interpolates back.
    """
    # Butcher tableau (Dormand & Prince 1980): stage nodes c, coefficients a, 5th-order weights b5, error weights.
    c = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
    a = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
         [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
         [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
         [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
    b5 = a[6] + [0.0]
    b4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
    e = [p - q for p, q in zip(b5, b4)]

    def rms(v):
        return float(v.pow(2).mean().sqrt())

    direction = 1.0 if t1 >= t0 else -1.0
    t, k1 = t0, f(x, t0)
    # Initial step (Hairer et al., Solving ODEs I, Sec. II.4): from the sizes of x, f and a finite-difference f'.
    scale = atol + rtol * x.abs()
    d0, d1 = rms(x / scale), rms(k1 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    d2 = rms((f(x + direction * h0 * k1, t0 + direction * h0) - k1) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h0, h1)
    for _ in range(max_steps):
        if direction * (t1 - t) <= 1e-12:
            return x
        h = min(h, abs(t1 - t))
        dt = direction * h
        k = [k1]
        for i in range(1, 7):
            xi = x + dt * sum(aij * kj for aij, kj in zip(a[i], k) if aij != 0.0)
            k.append(f(xi, t + c[i] * dt))
        x_new = x + dt * sum(bi * ki for bi, ki in zip(b5, k) if bi != 0.0)  # = the 7th stage's input (FSAL)
        err = dt * sum(ei * ki for ei, ki in zip(e, k) if ei != 0.0)
        ratio = rms(err / (atol + rtol * torch.maximum(x.abs(), x_new.abs())))
        if ratio <= 1.0:  # accept
            t = t1 if h == abs(t1 - t) else t + dt
            x, k1 = x_new, k[6]
        factor = ifactor if ratio == 0 else min(ifactor, max(safety * ratio ** -0.2, 1.0 if ratio <= 1 else dfactor))
        h = h * factor
    raise RuntimeError(f"dopri5 did not reach t={t1} in {max_steps} steps (stopped at t={t})")


# Sampling settings of each family's published evaluation (REFERENCE 8, 9). SiT: adaptive ODE (or SDE with 250
# steps), CFG on 3 channels everywhere. REPA: SDE with 250 steps, CFG 1.8 on all channels inside t in [0, 0.7].
SAMPLER_DEFAULTS = {
    "sit": dict(clock="sit", mode="ode", sampler="dopri5", ode_steps=250, sde_steps=250, cfg_scale=1.5,
                cfg_channels=3, guidance_low=0.0, guidance_high=1.0),
    "repa": dict(clock="repa", mode="sde", sampler="euler", ode_steps=50, sde_steps=250, cfg_scale=1.8,
                 cfg_channels=None, guidance_low=0.0, guidance_high=0.7),
}


def sample_transport(model, z, y, *, family="sit", mode=None, sampler=None, steps=None, cfg_scale=None,
                     cfg_channels="default", guidance_low=None, guidance_high=None, path_type="Linear",
                     prediction="velocity", atol=1e-6, rtol=1e-3, diffusion_form="sigma", diffusion_norm=1.0,
                     last_step="Mean", last_step_size=0.04, null_class=None, generator=None):
    """
    Draw samples from a SiT ("sit") or SiT+REPA ("repa") model: z (N, C, H, W) noise, y (N,) labels -> latents.
    Unset arguments take the family's published settings (SAMPLER_DEFAULTS). mode "ode" (sampler euler, heun,
    dopri5) or "sde" (Euler-Maruyama + last step). null_class defaults to the model's num_classes (1000).
    """
    if family not in SAMPLER_DEFAULTS:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(SAMPLER_DEFAULTS)}")
    d = SAMPLER_DEFAULTS[family]
    mode = mode or d["mode"]
    cfg_scale = d["cfg_scale"] if cfg_scale is None else cfg_scale
    cfg_channels = d["cfg_channels"] if cfg_channels == "default" else cfg_channels
    guidance = dict(cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                    guidance_low=d["guidance_low"] if guidance_low is None else guidance_low,
                    guidance_high=d["guidance_high"] if guidance_high is None else guidance_high,
                    null_class=getattr(model, "num_classes", 1000) if null_class is None else null_class)
    transport = Transport(path_type=path_type, prediction=prediction, clock=d["clock"])
    if mode == "ode":
        return transport.sample_ode(model, z, y, sampler=sampler or d["sampler"], steps=steps or d["ode_steps"],
                                    atol=atol, rtol=rtol, **guidance)
    if mode == "sde":
        return transport.sample_sde(model, z, y, steps=steps or d["sde_steps"], diffusion_form=diffusion_form,
                                    diffusion_norm=diffusion_norm, last_step=last_step,
                                    last_step_size=last_step_size, generator=generator, **guidance)
    raise ValueError(f"unknown mode {mode!r}; choose ode or sde")


#################################################################################
#                      DINOv2 (REPA's target representation)                    #
#################################################################################
# DINOv2 ViT/14 without registers (Oquab et al. 2023), as facebookresearch/dinov2's hub models build it: patch 14,
# 518 px position grid (37 x 37 + class token), LayerScale (init 1.0), LayerNorm eps 1e-6, exact GELU MLP (ViT-g:
# SwiGLU FFN). Names and shapes are those of dinov2_vit*14_pretrain.pth, so the released files load unchanged.
# REPA aligns SiT's hidden states with forward_features(x)["x_norm_patchtokens"] of ViT-B/14 (REFERENCE 9).

class DINOv2Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (dinov2 layers/attention.py names)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DINOv2Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DINOv2SwiGLU(nn.Module):
    """ViT-g's FFN: w12 -> (silu(x1) * x2) -> w3, hidden width 2/3 of 4D rounded up to a multiple of 8 (4096)."""

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class DINOv2LayerScale(nn.Module):
    """Per-channel residual scale gamma (CaiT's LayerScale)."""

    def __init__(self, dim, init_values=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x):
        return x * self.gamma


class DINOv2Block(nn.Module):
    """Pre-norm ViT block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, ffn="mlp"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DINOv2Attention(dim, num_heads)
        self.ls1 = DINOv2LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DINOv2Mlp(dim, 4 * dim) if ffn == "mlp" else DINOv2SwiGLU(dim, 4 * dim)
        self.ls2 = DINOv2LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2PatchEmbed(nn.Module):
    """14 x 14 patches -> tokens: (B, 3, H, W) -> (B, H/14 * W/14, D)."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"DINOv2 input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    """
    DINOv2 ViT/14 backbone. pos_embed_resample says how the 37 x 37 position grid meets other input sizes:
    "dinov2": as the official forward (bicubic with scale factor (n + 0.1) / 37, no antialias) - the default, equal
    to the official forward_features; "repa": as REPA, which resamples the grid once at load with timm's
    resample_abs_pos_embed (bicubic to exactly n x n, antialias on) and then runs the official forward.
    """

    def __init__(self, embed_dim=768, depth=12, num_heads=12, ffn="mlp", patch_size=14, img_size=518,
                 pos_embed_resample="dinov2"):
        super().__init__()
        if pos_embed_resample not in ("dinov2", "repa"):
            raise ValueError(f"pos_embed_resample={pos_embed_resample!r}; choose dinov2 or repa")
        self.embed_dim, self.patch_size, self.pos_embed_resample = embed_dim, patch_size, pos_embed_resample
        self.patch_embed = DINOv2PatchEmbed(patch_size, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # masked-image-modelling token (unused by REPA)
        self.blocks = nn.ModuleList([DINOv2Block(embed_dim, num_heads, ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self):
        # dinov2's init (only used for random-weight tests and the tiny stand-in): truncated normal 0.02.
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h, w):
        """Position embedding (1, 1 + h * w, D) for an h x w patch grid, resampled (in fp32) from the stored grid."""
        n = self.pos_embed.shape[1] - 1
        m = int(math.sqrt(n))
        if h == w == m:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:].float()
        patch_pos = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, m, m)
        if self.pos_embed_resample == "dinov2":
            # The official "historical kludge" (dino issue #8): a scale factor of (n + 0.1) / m rather than the
            # output size; F.interpolate then maps coordinates with that factor, which is not exactly size n.
            patch_pos = F.interpolate(patch_pos, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic",
                                      antialias=False)
        else:
            patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", antialias=True)
        assert patch_pos.shape[-2:] == (h, w)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos.float(), patch_pos], dim=1)

    def forward_features(self, x, masks=None):
        """
        x: (B, 3, H, W) ImageNet-normalised images, H and W multiples of 14; masks: optional (B, T) bool.
        Returns the official dict: x_norm_clstoken (B, D), x_norm_regtokens (B, 0, D), x_norm_patchtokens (B, T, D),
        x_prenorm (B, 1 + T, D), masks.
        """
        B, _, H, W = x.shape
        tokens = self.patch_embed(x)  # (B, T, D), T = H/14 * W/14
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        pos = self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        if self.pos_embed_resample == "dinov2" and pos is not self.pos_embed:
            pos = pos.to(tokens.dtype)  # the official code casts a resampled grid to the tokens' dtype (autocast)
        tokens = tokens + pos
        for block in self.blocks:
            tokens = block(tokens)
        x_norm = self.norm(tokens)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1:1],
                "x_norm_patchtokens": x_norm[:, 1:], "x_prenorm": tokens, "masks": masks}

    def forward(self, x):
        """The hub model's forward: the normalised class token (B, D) (its head is the identity)."""
        return self.forward_features(x)["x_norm_clstoken"]


def dinov2_vits14(**kwargs): return DINOv2(embed_dim=384, depth=12, num_heads=6, **kwargs)
def dinov2_vitb14(**kwargs): return DINOv2(embed_dim=768, depth=12, num_heads=12, **kwargs)
def dinov2_vitl14(**kwargs): return DINOv2(embed_dim=1024, depth=24, num_heads=16, **kwargs)
def dinov2_vitg14(**kwargs): return DINOv2(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu", **kwargs)
# Not a released model: a random-weight stand-in with ViT-B's interface but tiny, for --preset tiny and tests
# (no DINOv2 weights exist offline). Its features carry no meaning; it only exercises the REPA code path.
def dinov2_tiny(**kwargs): return DINOv2(embed_dim=64, depth=2, num_heads=2, **kwargs)


DINOv2_models = {"dinov2_vits14": dinov2_vits14, "dinov2_vitb14": dinov2_vitb14, "dinov2_vitl14": dinov2_vitl14,
                 "dinov2_vitg14": dinov2_vitg14, "dinov2_tiny": dinov2_tiny}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_dinov2(name="dinov2_vitb14", path=None, pos_embed_resample="dinov2"):
    """
    DINOv2_models[name] with the official weights (path, or torch hub's cache as find_weights resolves it), frozen
    and in eval mode. "dinov2_tiny" has no weights: random init. Wrong keys or shapes are an error naming them.
    """
    if name not in DINOv2_models:
        raise ValueError(f"unknown DINOv2 model {name!r}; valid: {', '.join(DINOv2_models)}")
    model = DINOv2_models[name](pos_embed_resample=pos_embed_resample)
    if name != "dinov2_tiny":
        path = find_weights(f"{name}_pretrain.pth", DINOV2_URL.format(name=name), path)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = state_dict.get("model", state_dict)
        own = model.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise ValueError(f"{path} is not a {name} checkpoint: missing keys (first 5 of {len(missing)}) "
                             f"{missing[:5]}, unexpected keys (first 5 of {len(unexpected)}) {unexpected[:5]}")
        for k, v in own.items():
            if tuple(v.shape) != tuple(state_dict[k].shape):
                raise ValueError(f"{path}: {k} has shape {tuple(state_dict[k].shape)}, {name} needs {tuple(v.shape)}")
        model.load_state_dict(state_dict)
    model.eval().requires_grad_(False)
    return model


def dinov2_preprocess(x, resolution=None):
    """
    REPA's encoder input from images x (B, 3, H, W) in [-1, 1]: [0, 1] -> ImageNet mean/std -> bicubic resize to
    (H / 16) * 14 (224 for 256 px), so the DINOv2 patch grid matches SiT/2's token grid on the f8 latent.
    """
    resolution = resolution or (x.shape[-1] // 16) * 14
    x = (x + 1) / 2
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, size=(resolution, resolution), mode="bicubic")  # as REPA: normalise, then resize
