@echo off
rem Para o monitor com seguranca (espera a solicitacao em andamento terminar).
powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0bg.ps1" stop monitor monitor_bemsoft.py %*
exit /b %ERRORLEVEL%
